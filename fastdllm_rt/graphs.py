"""CUDA-graph replay of the unified forward (``triton`` backend on a GPU).

A decode step at batch 1 launches ~250 small kernels; replaying them from a CUDA graph removes the host's
launch cost, which otherwise exceeds the GPU time. Graphs are keyed by the batch's layout signature (row
kinds, rows per kind, tokens per row, skipped-layer rows): the full-block, sub-block (computing or skipping)
and commit steps of a batch each get one. A layout runs eagerly the first time it is seen; the second time it
is captured (one more eager run compiles kernels and allocates) and replayed from then on (``CaptureSchedule``
says why and which graphs are kept). Prefill and plain windows, whose lengths vary, always run eagerly.

Counters: the model counts layer evaluations as its Python code runs, which a replay does not do. The runner
records what the captured forward counted and adds exactly that on every replay.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .batch import Kind, pack_batch, rebind, upload

GRAPHABLE = {Kind.FULL, Kind.SUB, Kind.COMMIT}
MAX_GRAPH_TOKENS = 2048         # larger steps are GPU-bound: launch overhead no longer matters


class _Captured:
    __slots__ = ("graph", "buffer", "batch", "logits", "computed", "skipped")


class CaptureSchedule:
    """Which batch layouts hold a CUDA graph.

    * A layout is captured the second time it is seen: a one-off layout (a batch whose rows finish at different
      steps passes through many) runs eagerly instead of paying a capture.
    * At most ``max_graphs`` are held. When full, a new layout takes the place of the least recently replayed
      graph only if that graph was replayed in neither the current call nor the one before (``new_call``, at
      each generate or scoring call's cache reset); otherwise it runs eagerly. So a later call with other
      layouts gets its graphs from its second call on, while a batch whose rows drift apart - passing through
      more layouts than the budget, most of them briefly - keeps the graphs it holds instead of recapturing.

    Measured: the fixed budget before (session 11) kept whatever came first: after a batch of 32 had filled it,
    every step of a later batch-1 call ran eagerly - 67.7 tokens/s instead of 159 (device run 90). Plain
    least-recently-used eviction fixed that but made a batch of 32 recapture throughout: 929 tokens/s instead
    of 1414-1527 (run 91). Replaying the layout sequence of bench/e2e.py's calls on the tiny checkpoint (CPU;
    a batch of 32 passes through 127 layouts in 288 forwards, 67 of them once) through this schedule: the
    timed batch-32 call replays 117 forwards and captures none (the fixed budget: 61 replays; LRU: 127
    captures), the batch-1 calls after it capture 3 graphs in their second call and replay every forward of
    the third."""

    def __init__(self, max_graphs: int = 32, max_sightings: int = 4096, keep_calls: int = 2):
        self.max_graphs, self.max_sightings, self.keep_calls = max_graphs, max_sightings, keep_calls
        self.held: OrderedDict = OrderedDict()          # signature -> graph, least recently replayed first
        self._call_of: dict = {}                        # signature -> the call that last replayed it
        self._sighted: OrderedDict = OrderedDict()      # layouts seen and not (yet) captured
        self._call = 0

    def new_call(self) -> None:
        self._call += 1

    def get(self, sig):
        """The graph held for ``sig`` (now the most recently used), or None."""
        cap = self.held.get(sig)
        if cap is not None:
            self.held.move_to_end(sig)
            self._call_of[sig] = self._call
        return cap

    def admit(self, sig) -> bool:
        """Whether ``sig`` (not held) is captured now; makes room by evicting a stale graph if needed."""
        if sig not in self._sighted:
            self._sighted[sig] = None
            if len(self._sighted) > self.max_sightings:
                self._sighted.popitem(last=False)
            return False
        while len(self.held) >= self.max_graphs:       # (a loop: the budget may have been lowered)
            oldest = next(iter(self.held))
            if self._call_of[oldest] > self._call - self.keep_calls:
                return False                            # every held graph was replayed lately
            del self.held[oldest], self._call_of[oldest]    # its memory goes back to the graph pool
        del self._sighted[sig]
        return True

    def hold(self, sig, cap) -> None:
        self.held[sig] = cap
        self._call_of[sig] = self._call

    def clear(self) -> None:
        self.held.clear()
        self._call_of.clear()
        self._sighted.clear()


class GraphRunner:
    def __init__(self, model, caches, reuse, max_graphs: int = 32):
        self.model, self.caches, self.reuse = model, caches, reuse
        self.schedule = CaptureSchedule(max_graphs)
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = self.captures = 0
        self.last: _Captured | None = None          # the graph the latest forward replayed (benchmarks time it)

    def forward(self, requests, block_size: int):
        """Run the packed forward of ``requests``; returns (fp32 logits, ForwardBatch)."""
        packed = pack_batch(requests, block_size)
        kinds = {kind for kind, *_ in packed.layout}
        sig = packed.signature
        graphable = kinds <= GRAPHABLE and packed.T <= MAX_GRAPH_TOKENS
        cap = self.schedule.get(sig) if graphable else None
        if cap is None and graphable and self.schedule.admit(sig):
            cap = self._capture(packed)
            self.schedule.hold(sig, cap)
            self.captures += 1
        if cap is None:
            batch = upload(packed, self.model.device)
            return self.model(batch, self.caches, self.reuse), batch
        cap.buffer.copy_(packed.host, non_blocking=True)
        cap.graph.replay()
        batch = rebind(cap.batch, packed)                 # host work while the GPU runs
        self.replays += 1
        self.last = cap
        m = self.model
        for i, (c, s) in enumerate(zip(cap.computed, cap.skipped)):
            m.layer_rows_computed[i] += c
            m.layer_rows_skipped[i] += s
        return cap.logits.clone(), batch

    @property
    def graphs(self) -> dict:
        """The graphs held now, by layout signature."""
        return self.schedule.held

    def close(self) -> None:
        self.schedule.clear()
        self.last = None
        self.caches = None

    def _capture(self, packed) -> _Captured:
        m = self.model
        cap = _Captured()
        cap.buffer = packed.host.to(m.device)
        batch = cap.batch = upload(packed, m.device, buffer=cap.buffer)
        before_c, before_s = list(m.layer_rows_computed), list(m.layer_rows_skipped)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                      # warm-up: compiles kernels, allocates
            m(batch, self.caches, self.reuse)
        torch.cuda.current_stream().wait_stream(side)
        mid_c, mid_s = list(m.layer_rows_computed), list(m.layer_rows_skipped)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            cap.logits = m(batch, self.caches, self.reuse)
        after_c, after_s = list(m.layer_rows_computed), list(m.layer_rows_skipped)
        cap.computed = [a - b for a, b in zip(after_c, mid_c)]
        cap.skipped = [a - b for a, b in zip(after_s, mid_s)]
        # the warm-up and the capture are not steps of the call: undo their counts; the replay counts once
        m.layer_rows_computed = list(before_c)
        m.layer_rows_skipped = list(before_s)
        cap.graph = graph
        return cap
