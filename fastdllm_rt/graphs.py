"""CUDA-graph replay of the unified forward (``triton`` backend on a GPU).

A decode step at batch 1 launches ~250 small kernels; replaying them from a CUDA graph removes the host's
launch cost, which otherwise exceeds the GPU time. Graphs are keyed by the batch's layout signature (row
kinds, rows per kind, tokens per row, skipped-layer rows): the full-block, sub-block (computing or skipping)
and commit steps of a batch each get one. A step whose layout has no graph yet runs once eagerly (compiling
any kernel), is captured, then replayed; prefill and plain windows, whose lengths vary, always run eagerly.

Counters: the model counts layer evaluations as its Python code runs, which a replay does not do. The runner
records what the captured forward counted and adds exactly that on every replay.
"""
from __future__ import annotations

import torch

from .batch import Kind, pack_batch, rebind, upload

GRAPHABLE = {Kind.FULL, Kind.SUB, Kind.COMMIT}
MAX_GRAPH_TOKENS = 2048         # larger steps are GPU-bound: launch overhead no longer matters


class _Captured:
    __slots__ = ("graph", "buffer", "batch", "logits", "computed", "skipped")


class GraphRunner:
    def __init__(self, model, caches, reuse, max_graphs: int = 32):
        self.model, self.caches, self.reuse = model, caches, reuse
        self.graphs: dict[tuple, _Captured] = {}
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0
        self.last: _Captured | None = None          # the graph the latest forward replayed (benchmarks time it)

    def forward(self, requests, block_size: int):
        """Run the packed forward of ``requests``; returns (fp32 logits, ForwardBatch)."""
        packed = pack_batch(requests, block_size)
        kinds = {kind for kind, *_ in packed.layout}
        sig = packed.signature
        if (not kinds <= GRAPHABLE or packed.T > MAX_GRAPH_TOKENS
                or (sig not in self.graphs and len(self.graphs) >= self.max_graphs)):
            batch = upload(packed, self.model.device)
            return self.model(batch, self.caches, self.reuse), batch
        cap = self.graphs.get(sig)
        if cap is None:
            cap = self._capture(packed)
            self.graphs[sig] = cap
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

    def close(self) -> None:
        self.graphs.clear()
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
