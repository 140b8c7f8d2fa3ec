"""The caches a runtime keeps between calls, and the CUDA-graph runners bound to them.

Allocating caches (and capturing graphs, which bake in the cache tensors) costs more than many decode steps,
so a call takes the pooled caches when they are large enough and have the same reuse layers; otherwise the pool
frees them and allocates new ones.
"""
from __future__ import annotations

import gc

import torch

from .cache import Caches
from .forwards import ForwardRunner
from .graphs import GraphRunner
from .reuse import ReuseRuntime
from .stats import CallStats


class CachePool:
    def __init__(self, model):
        self.model = model
        self.caches: Caches | None = None
        self.runners: dict = {}             # reuse schedule -> GraphRunner over ``caches``

    def acquire(self, num_slots: int, max_len: int, plan) -> Caches:
        """Caches with at least ``num_slots`` slots of ``max_len`` positions and ``plan``'s reuse buffers."""
        layers = plan.layers if plan is not None else ()
        mode = plan.mode if plan is not None else None
        if self.caches is not None and self.caches.fits(num_slots, max_len, layers, mode):
            self.caches.reset()
            for runner in self.runners.values():
                runner.schedule.new_call()
            return self.caches
        self.release()
        m = self.model
        self.caches = Caches(m.config, num_slots, max_len, m.dtype, m.device, reuse_layers=layers, reuse_mode=mode)
        return self.caches

    def start_call(self, num_slots: int, max_len: int, plan, stats: CallStats):
        """Caches for a call and the ``ForwardRunner`` that runs its forwards over them (with ``plan``'s reuse
        and, where the backend allows, CUDA graphs)."""
        caches = self.acquire(num_slots, max_len, plan)
        reuse = ReuseRuntime(plan, caches) if plan is not None else None
        runner = ForwardRunner(self.model, caches, stats=stats, reuse=reuse, graphs=self.graph_runner(reuse))
        return caches, runner

    def graph_runner(self, reuse):
        """The runner for the pooled caches and this reuse schedule (a graph bakes in both), or None where the
        backend cannot be captured."""
        if not self.model.backend.supports_cuda_graphs or self.caches is None:
            return None
        key = None if reuse is None else (reuse.plan.k, reuse.plan.mode, reuse.plan.layers)
        if key not in self.runners:
            self.runners[key] = GraphRunner(self.model, self.caches, reuse)
        runner = self.runners[key]
        runner.reuse = reuse
        return runner

    def release(self) -> None:
        """Free the pooled caches and their graphs (before allocating larger ones, or to give memory back)."""
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        if self.caches is not None:
            self.caches.close()
            self.caches = None
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
