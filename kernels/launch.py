"""Programmatic dependent launch (PDL) for the decode-step kernels.

A batch-1 decode step is a chain of ~200 kernels of 3-100 us, each waiting for the one before it. Between two
kernels the GPU idles: the last programs of one drain, the next is launched, its programs load their first
tiles. On Hopper and newer, a kernel launched with ``launch_pdl=True`` may start while its predecessor still
runs; its programs do whatever needs nothing from the predecessor, then ``gdc_wait()`` until the predecessor
has finished and its writes are visible. Our kernels:

* call ``wait_for_producer`` before their first read of anything an earlier kernel wrote, and before any
  write (a program that returned without waiting could let the kernel complete before its predecessor, and the
  next kernel's wait would then order nothing);
* then allow their own successor to launch (``gdc_launch_dependents``) - after the wait, so at most one kernel
  is ever launched ahead.

cuBLAS and PyTorch kernels in the chain launch normally and wait for their predecessor to complete; a PDL
kernel after them waits as usual.

It is OFF by default: ``FASTDLLM_PDL=1`` turns it on for CUDA devices of compute capability 9.0 and newer
(read at each launch, so CUDA graphs captured after the change follow it; never under the Triton
interpreter). Measured on an H100 (bench/pdl_gap.py, bench/steps.py, device runs 21-24): inside a CUDA
graph the gap between two dependent kernels is already 0.93 us and PDL makes it 0.61 us, but whole decode
steps got 0-9 % *slower* with it (7B full-block 7.35 against 6.86 ms; 1.5B 2.65 against 2.53) - programs
launched early are placed on whichever SMs have room while the previous kernel still runs, and a
weight-streaming kernel needs its programs spread over every SM. Prefetching the next kernel's weights (bulk
L2 prefetch before the wait), and the attention's K/V, made things slower again (runs 21); not kept.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (``FASTDLLM_PDL=1``)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("FASTDLLM_PDL", "0") != "1":
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed (its writes visible), then let the next
    kernel launch. A no-op when the kernel was not launched with PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()

