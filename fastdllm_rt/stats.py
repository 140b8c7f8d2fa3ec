"""Counters every sampling and scoring call returns (docs/design.md, Counters).

Forward counts are kept two ways: ``forwards[kind]`` counts forward calls that contained rows of that kind
(at batch 1, one per call), ``row_forwards[kind]`` counts rows. Layer evaluations are per row-forward:
``computed + skipped == num_layers * sum(row_forwards)``. Time: ``wall_time_s`` for the whole call;
``forward_time_s`` summed over forwards, from CUDA events on a GPU (no host synchronisation until the call
ends) or from the host clock on CPU (labelled by ``timer``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

KINDS = ("plain", "prefill", "commit", "full_block", "sub_block")


@dataclass
class CallStats:
    num_layers: int
    device: str = "cpu"
    requests: int = 0
    forwards: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    row_forwards: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    model_calls: int = 0
    tokens_forwarded: int = 0
    tokens_generated: int = 0
    continuation_tokens_scored: int = 0
    prefix_tokens_served: int = 0       # context/prompt tokens whose K/V came from the prefix cache
    prefix_tokens_computed: int = 0     # context/prompt tokens prefilled by a forward
    prefix_evictions: int = 0           # blocks the prefix cache evicted during the call
    layers_computed: list = field(default_factory=list)
    layers_skipped: list = field(default_factory=list)
    wall_time_s: float = 0.0
    forward_time_s: float = 0.0
    timer: str = "host_clock"
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if not self.layers_computed:
            self.layers_computed = [0] * self.num_layers
            self.layers_skipped = [0] * self.num_layers

    @property
    def skipped_layer_evaluations(self) -> int:
        return sum(self.layers_skipped)

    @property
    def computed_layer_evaluations(self) -> int:
        return sum(self.layers_computed)

    @property
    def total_row_forwards(self) -> int:
        return sum(self.row_forwards.values())

    def merge(self, other: "CallStats") -> "CallStats":
        """Add another call's counters into this one (bridge totals, data-parallel ranks)."""
        self.requests += other.requests
        for k in KINDS:
            self.forwards[k] += other.forwards.get(k, 0)
            self.row_forwards[k] += other.row_forwards.get(k, 0)
        self.model_calls += other.model_calls
        self.tokens_forwarded += other.tokens_forwarded
        self.tokens_generated += other.tokens_generated
        self.continuation_tokens_scored += other.continuation_tokens_scored
        self.prefix_tokens_served += other.prefix_tokens_served
        self.prefix_tokens_computed += other.prefix_tokens_computed
        self.prefix_evictions += other.prefix_evictions
        self.layers_computed = [a + b for a, b in zip(self.layers_computed, other.layers_computed)]
        self.layers_skipped = [a + b for a, b in zip(self.layers_skipped, other.layers_skipped)]
        self.wall_time_s += other.wall_time_s
        self.forward_time_s += other.forward_time_s
        self.timer = other.timer if other.model_calls else self.timer
        self.device = other.device
        self.notes.extend(n for n in other.notes if n not in self.notes)
        return self

    def to_dict(self) -> dict:
        return {
            "device": self.device, "requests": self.requests, "forwards": dict(self.forwards),
            "row_forwards": dict(self.row_forwards), "model_calls": self.model_calls,
            "tokens_forwarded": self.tokens_forwarded, "tokens_generated": self.tokens_generated,
            "continuation_tokens_scored": self.continuation_tokens_scored,
            "prefix_cache": {"tokens_served": self.prefix_tokens_served,
                             "tokens_computed": self.prefix_tokens_computed, "evictions": self.prefix_evictions},
            "layer_evaluations": {"computed": self.computed_layer_evaluations,
                                  "skipped": self.skipped_layer_evaluations,
                                  "computed_per_layer": list(self.layers_computed),
                                  "skipped_per_layer": list(self.layers_skipped)},
            "wall_time_s": self.wall_time_s, "forward_time_s": self.forward_time_s, "forward_timer": self.timer,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CallStats":
        le = d["layer_evaluations"]
        return cls(num_layers=len(le["computed_per_layer"]), device=d["device"], requests=d["requests"],
                   forwards=dict(d["forwards"]), row_forwards=dict(d["row_forwards"]),
                   model_calls=d["model_calls"], tokens_forwarded=d["tokens_forwarded"],
                   tokens_generated=d["tokens_generated"],
                   continuation_tokens_scored=d["continuation_tokens_scored"],
                   prefix_tokens_served=d.get("prefix_cache", {}).get("tokens_served", 0),
                   prefix_tokens_computed=d.get("prefix_cache", {}).get("tokens_computed", 0),
                   prefix_evictions=d.get("prefix_cache", {}).get("evictions", 0),
                   layers_computed=list(le["computed_per_layer"]), layers_skipped=list(le["skipped_per_layer"]),
                   wall_time_s=d["wall_time_s"], forward_time_s=d["forward_time_s"], timer=d["forward_timer"],
                   notes=list(d.get("notes", [])))


class ForwardTimer:
    """Times forwards with CUDA events (read once, at ``finish``) or the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs = []
        self._host = 0.0
        self._t0 = None

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._t0 = ev
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pairs.append((self._t0, ev))
        else:
            self._host += time.perf_counter() - self._t0

    def finish(self) -> tuple[float, str]:
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._pairs) / 1000.0
            self._pairs.clear()
            return total, "cuda_events"
        return self._host, "host_clock"
