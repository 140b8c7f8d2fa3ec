"""Runs a call's forwards and keeps its counters.

``ForwardRunner.run`` packs a step's row requests into one forward (several when they hold more than
``max_tokens`` tokens, e.g. a large prefill, so activation memory stays bounded), replays a CUDA graph where
the pool offers one, and adds what each forward reports to the call's ``CallStats``.
"""
from __future__ import annotations

import time

import torch

from .batch import Kind, RowRequest, build_batch
from .errors import NumericsError
from .profiling import forward_name, named_range
from .stats import CallStats, ForwardTimer


class ForwardRunner:
    def __init__(self, model, caches, *, stats: CallStats, reuse=None, graphs=None, max_tokens: int | None = None):
        self.model = model
        self.caches = caches
        self.reuse = reuse                  # a ReuseRuntime or None
        self.graphs = graphs                # a GraphRunner or None
        self.stats = stats
        self.device = model.device
        self.block_size = model.block_size
        self.max_tokens = max_tokens or (16384 if self.device.type == "cuda" else 4096)
        self.timer = ForwardTimer(self.device)
        self._t0 = time.perf_counter()

    def run(self, requests: list[RowRequest]):
        """One step: returns (fp32 logits, per request ``(index, lo, hi)`` rows of those logits)."""
        if sum(r.tokens.numel() for r in requests) <= self.max_tokens or len(requests) <= 1:
            return self._run(requests)
        parts, chunk, size = [], [], 0
        for i, r in enumerate(requests):
            n = r.tokens.numel()
            if chunk and size + n > self.max_tokens:
                parts.append(chunk)
                chunk, size = [], 0
            chunk.append(i)
            size += n
        parts.append(chunk)
        logits, rows, offset = [], [None] * len(requests), 0
        for idx in parts:
            lg, part_rows = self._run([requests[i] for i in idx])
            for (_, lo, hi), i in zip(part_rows, idx):
                rows[i] = (i, offset + lo, offset + hi)
            logits.append(lg)
            offset += lg.shape[0]
        return torch.cat(logits), rows

    def _run(self, requests: list[RowRequest]):
        self.timer.start()
        with named_range(forward_name(requests), self.device):
            if self.graphs is not None:
                out, batch = self.graphs.forward(requests, self.block_size)
            else:
                batch = build_batch(requests, self.device, self.block_size)
                out = self.model(batch, self.caches, self.reuse)
        self.timer.stop()
        st = self.stats
        st.model_calls += 1
        st.tokens_forwarded += batch.num_tokens
        st.prefix_tokens_computed += sum(g.tok_hi - g.tok_lo for g in batch.groups if g.kind is Kind.PREFILL)
        for label, rows in batch.counts_by_kind().items():
            st.forwards[label] += 1
            st.row_forwards[label] += rows
        st.layers_computed = [a + b for a, b in zip(st.layers_computed, out.layers_computed)]
        st.layers_skipped = [a + b for a, b in zip(st.layers_skipped, out.layers_skipped)]
        return out.logits, batch.logits_rows

    def finish(self) -> CallStats:
        st = self.stats
        st.forward_time_s, st.timer = self.timer.finish()
        st.wall_time_s = time.perf_counter() - self._t0
        st.device = str(self.device)
        return st


def check_finite(flag: torch.Tensor | bool, what: str) -> None:
    if not bool(flag):
        raise NumericsError(f"the model produced non-finite logits during {what}; the weights or the dtype are "
                            f"wrong (try dtype='fp32' to confirm, or check the checkpoint for NaN/Inf)")
