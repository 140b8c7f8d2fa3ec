"""Throughput of every request type, for summary.json.

Each harness call (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) is bracketed by CUDA
events on a GPU (recorded, not waited on: the only synchronisation is when the report is made) and by the
host clock; the runtime's own counters (forwards by kind, tokens, layer evaluations, per-forward device time)
are merged per type. On CPU there is no device clock and the report says so."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from fastdllm_rt.stats import CallStats


class _Entry:
    def __init__(self, num_layers):
        self.stats = CallStats(num_layers=num_layers)
        self.calls = 0
        self.wall_s = 0.0
        self.events = []

    def add(self, stats: CallStats):
        self.stats.merge(stats)


class Throughput:
    _capture_open = False

    def __init__(self, device: torch.device, num_layers: int):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.num_layers = num_layers
        self.entries: dict[str, _Entry] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def timing(self, request_type: str):
        if self.cuda and os.environ.get("FASTDLLM_PROFILE") == "1" and not Throughput._capture_open:
            torch.cuda.profiler.start()      # nsys --capture-range=cudaProfilerApi: the timed region begins
            Throughput._capture_open = True
        entry = self.entries.setdefault(request_type, _Entry(self.num_layers))
        start = end = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            yield entry
        finally:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                entry.events.append((start, end))
            entry.wall_s += time.perf_counter() - t0
            entry.calls += 1

    def to_dict(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = {}
        for kind, e in self.entries.items():
            device_s = sum(a.elapsed_time(b) for a, b in e.events) / 1e3 if self.cuda else None
            out[kind] = describe(e.stats, e.calls, e.wall_s, device_s)
        out["_device"] = {
            "gpu": torch.cuda.get_device_name(self.device) if self.cuda else None,
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
            "clock": "cuda_events and wall" if self.cuda else "wall only (no GPU: device time not measured)",
        }
        return out


def describe(st: CallStats, calls: int, wall_s: float, device_s) -> dict:
    d = st.to_dict()
    denoise = st.row_forwards.get("full_block", 0) + st.row_forwards.get("sub_block", 0)
    useful = st.tokens_generated or st.continuation_tokens_scored
    rows = st.total_row_forwards

    def per_s(x, t):
        return None if not t else x / t

    d.update({
        "harness_calls": calls,
        "wall_time_s": wall_s,
        "device_time_s": device_s,
        "tokens_per_forward": (st.tokens_generated / (denoise + st.row_forwards.get("commit", 0) or 1)
                               if st.tokens_generated else (st.continuation_tokens_scored / rows if rows else 0.0)),
        "skipped_layer_fraction": (st.skipped_layer_evaluations / (st.skipped_layer_evaluations
                                                                   + st.computed_layer_evaluations)
                                   if st.computed_layer_evaluations else 0.0),
        "tokens_per_s_wall": per_s(useful, wall_s),
        "tokens_per_s_device": per_s(useful, device_s),
        "forwarded_tokens_per_s_wall": per_s(st.tokens_forwarded, wall_s),
        "forwarded_tokens_per_s_device": per_s(st.tokens_forwarded, device_s),
        "requests_per_s_wall": per_s(st.requests, wall_s),
        "tokens_counted": "tokens_generated" if st.tokens_generated else "continuation_tokens_scored",
        "prefix_served_fraction": (st.prefix_tokens_served / (st.prefix_tokens_served + st.prefix_tokens_computed)
                                   if st.prefix_tokens_served + st.prefix_tokens_computed else 0.0),
    })
    return d


def merge_reports(reports: list[dict]) -> dict:
    """Combine the per-rank throughput dicts of a data-parallel run: counters add up, times are the slowest
    rank's (ranks run concurrently), rates are recomputed from the sums."""
    kinds = sorted({k for r in reports for k in r if not k.startswith("_")})
    out = {}
    for kind in kinds:
        parts = [r[kind] for r in reports if kind in r]
        st = CallStats.from_dict(parts[0])
        for p in parts[1:]:
            st.merge(CallStats.from_dict(p))
        wall = max(p["wall_time_s"] for p in parts)
        dev = [p["device_time_s"] for p in parts]
        out[kind] = describe(st, sum(p["harness_calls"] for p in parts), wall,
                             None if any(x is None for x in dev) else max(dev))
        out[kind]["ranks"] = len(parts)
    out["_device"] = reports[0].get("_device", {})
    peaks = [r.get("_device", {}).get("peak_gpu_memory_bytes") for r in reports]
    if all(p is not None for p in peaks):
        out["_device"]["peak_gpu_memory_bytes"] = max(peaks)
    return out
