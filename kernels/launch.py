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

It is OFF by default: ``FASTDLLM_PDL=1`` turns it on (``FASTDLLM_PDL=exit``: the same, but each kernel lets
its successor launch only when its programs exit) for CUDA devices of compute capability 9.0 and newer
(read at each launch, so CUDA graphs captured after the change follow it; never under the Triton
interpreter). Measured on an H100 (bench/pdl_gap.py, bench/steps.py, device runs 21-24): inside a CUDA
graph the gap between two dependent kernels is already 0.93 us and PDL makes it 0.61 us, but whole decode
steps got 0-9 % *slower* with it (7B full-block 7.35 against 6.86 ms; 1.5B 2.65 against 2.53) - programs
launched early are placed on whichever SMs have room while the previous kernel still runs, and a
weight-streaming kernel needs its programs spread over every SM. Prefetching the next kernel's weights (bulk
L2 prefetch before the wait), and the attention's K/V, made things slower again (runs 21); not kept. Run 38
confirmed the cause: with the trigger at exit, steps take what ordinary launches take (7B full-block replay
6.33 against 6.29 ms; with the trigger after the wait 6.84) - and gain nothing, since a cuBLAS kernel sits on
one side of many of a step's kernel boundaries.
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


def pdl_mode(device: torch.device) -> int:
    """How kernels on ``device`` launch: 0 ordinarily; with programmatic dependent launch, 1 letting the next
    kernel launch as soon as this one has passed its wait (``FASTDLLM_PDL=1``), 2 only when this one's programs
    exit (``FASTDLLM_PDL=exit``: the next kernel's programs cannot take SM room this one's later programs need)."""
    value = os.environ.get("FASTDLLM_PDL", "0")
    if value not in ("0", "1", "exit"):
        raise ValueError(f"FASTDLLM_PDL={value!r}: expected 0 (off), 1 or exit")
    if value == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if _capability_major(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    return 1 if value == "1" else 2


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (``FASTDLLM_PDL=1`` or ``exit``)."""
    return pdl_mode(device) > 0


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed (its writes visible); under mode 1 then let
    the next kernel launch. A no-op when the kernel was not launched with PDL (``PDL`` = ``pdl_mode``)."""
    if PDL:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()
