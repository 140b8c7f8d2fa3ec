"""Named ranges for profilers, one per forward (named by the kinds it holds) and per sampling/scoring call.

NVTX ranges (for nsys) are emitted only on CUDA; ``torch.profiler.record_function`` ranges only while
``FASTDLLM_TORCH_PROFILE`` is set (the torch-profiler fallback of sbatch/profile.sh). Otherwise a range costs
one environment lookup at import time and nothing per call."""
from __future__ import annotations

import contextlib
import os

import torch

_TORCH_PROFILE = bool(os.environ.get("FASTDLLM_TORCH_PROFILE"))
_NVTX = os.environ.get("FASTDLLM_NVTX", "1") != "0"


@contextlib.contextmanager
def named_range(name: str, device: torch.device | None = None):
    use_nvtx = _NVTX and device is not None and device.type == "cuda"
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    ctx = torch.profiler.record_function(name) if _TORCH_PROFILE else contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()


def forward_name(requests) -> str:
    kinds = sorted({r.kind.label + ("_skip" if r.skip else "") for r in requests})
    return "fastdllm:" + "+".join(kinds)
