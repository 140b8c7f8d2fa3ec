"""CUDA-graph replay of the forward (backends with ``supports_cuda_graphs``).

A decode step at batch 1 launches a few hundred small kernels; replaying them from a CUDA graph removes the
host's launch cost, which otherwise exceeds the GPU time. Graphs are keyed by the batch's layout signature (row
kinds, rows per kind, tokens per row, skipped-layer rows): the full-block, sub-block (computing or skipping)
and commit steps of a batch each get one. A layout runs eagerly the first time it is seen; the second time it
is captured (one more eager run compiles kernels and allocates) and replayed from then on (``CaptureSchedule``
says why and which graphs are kept). Prefill and plain windows, whose lengths vary, always run eagerly.

Counters: a replay runs no Python, so the runner keeps the layer counts the captured forward returned and
returns them with every replay.

Timing: with ``time_replays`` on (an argument, or the attribute on a pooled runner), CUDA events bracket each
replay and ``last_replay_ms`` reads the latest one: the GPU time of the graph alone, without the host's batch
packing and metadata upload (bench/steps.py's replay column). Off, a replay records nothing.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .batch import Kind, pack_batch, rebind, upload
from .model import ForwardOutput

GRAPHABLE = {Kind.FULL, Kind.SUB, Kind.COMMIT}
MAX_GRAPH_TOKENS = 2048         # larger steps are GPU-bound: launch overhead no longer matters


class _Captured:
    __slots__ = ("graph", "buffer", "batch", "output")


class CaptureSchedule:
    """Which batch layouts hold a CUDA graph.

    * A layout is captured the second time it is seen: a one-off layout (a batch whose rows finish at different
      steps passes through many) runs eagerly instead of paying a capture.
    * At most ``max_graphs`` are held. When full, a new layout takes the place of the least recently replayed
      graph only if that graph was replayed in neither the current call nor the one before (``new_call``, at
      each generate or scoring call's cache reset); otherwise it runs eagerly. So a later call with other
      layouts gets its graphs from its second call on, while a batch whose rows drift apart - passing through
      more layouts than the budget, most of them briefly - keeps the graphs it holds instead of recapturing.

    Why not a plain least-recently-used budget: a batch whose rows drift apart would then recapture throughout;
    why not keep whatever came first: a later call with other layouts (batch 1 after batch 32) would run
    every step eagerly. tests/rt/test_graphs.py replays both situations through this schedule."""

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
    def __init__(self, model, caches, reuse, max_graphs: int = 32, time_replays: bool = False):
        self.model, self.caches, self.reuse = model, caches, reuse
        self.schedule = CaptureSchedule(max_graphs)
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = self.captures = 0
        self.time_replays = time_replays
        self._events = None                 # (start, end) CUDA events of the latest timed replay

    def forward(self, requests, block_size: int):
        """Run the packed forward of ``requests``; returns (ForwardOutput, ForwardBatch)."""
        packed = pack_batch(requests, block_size)
        sig = packed.signature
        graphable = packed.kinds <= GRAPHABLE and packed.T <= MAX_GRAPH_TOKENS
        cap = self.schedule.get(sig) if graphable else None
        if cap is None and graphable and self.schedule.admit(sig):
            cap = self._capture(packed)
            self.schedule.hold(sig, cap)
            self.captures += 1
        if cap is None:
            batch = upload(packed, self.model.device)
            return self.model(batch, self.caches, self.reuse), batch
        cap.buffer.copy_(packed.host, non_blocking=True)
        if self.time_replays:
            self._timed_replay(cap.graph)
        else:
            cap.graph.replay()
        batch = rebind(cap.batch, packed)                 # host work while the GPU runs
        self.replays += 1
        out = cap.output
        return ForwardOutput(out.logits.clone(), list(out.layers_computed), list(out.layers_skipped)), batch

    def _timed_replay(self, graph) -> None:
        if self._events is None:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start, end = self._events
        start.record()
        graph.replay()
        end.record()

    def last_replay_ms(self) -> float | None:
        """GPU time (ms) of the latest replay run with ``time_replays`` on (waits for it to finish); None when no
        replay was timed. A forward that ran eagerly leaves it unchanged: compare ``replays`` before and after."""
        if self._events is None:
            return None
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end)

    @property
    def graphs(self) -> dict:
        """The graphs held now, by layout signature."""
        return self.schedule.held

    def close(self) -> None:
        self.schedule.clear()
        self.caches = None

    def _capture(self, packed) -> _Captured:
        m = self.model
        cap = _Captured()
        cap.buffer = packed.host.to(m.device)
        batch = cap.batch = upload(packed, m.device, buffer=cap.buffer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                      # warm-up: compiles kernels, allocates
            m(batch, self.caches, self.reuse)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            cap.output = m(batch, self.caches, self.reuse)
        cap.graph = graph
        return cap
