"""``l2_prefetch``: ask the L2 to fetch the first bytes of a weight before the kernel that reads them starts.

A batch-1 decode layer reads its weights at full bandwidth only in the two big MLP projections; while the QKV
projection, attention and the O projection run (small weights, a few MB of keys and values, each kernel bound
by its latency) the memory system is mostly idle. Issued when the layer's attention starts, a prefetch of the
gate/up weight's first bytes lets those bytes arrive during that idle time, and the gate/up projection then
reads them from the L2 instead of HBM.

The kernel is one instruction per lane, ``cp.async.bulk.prefetch.L2`` (Hopper's bulk-copy engine: it returns at
once and holds no registers or shared memory while the lines arrive), so it costs a launch of one or two
programs. It changes no value: a prefetch is only a hint, which is also its reference (doing nothing). It runs
on compute capability 9.0 and above; elsewhere (older GPUs, Triton's interpreter) ``l2_prefetch`` does nothing.
"""
import functools
import os

import torch
import triton
import triton.language as tl

CHUNK = 65536       # bytes each lane asks for (a multiple of 16, as the instruction requires)
LANES = 128


@triton.jit
def l2_prefetch_kernel(p, nbytes, p_sink, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Lane i asks for bytes [i * CHUNK, (i + 1) * CHUNK) of [p, p + nbytes) (``nbytes`` a multiple of CHUNK;
    lanes past the end repeat the last piece)."""
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    off = tl.minimum(lane.to(tl.int64) * CHUNK, nbytes - CHUNK)
    r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [p.to(tl.pointer_type(tl.int8)) + off, tl.full([LANES], CHUNK, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.store(p_sink + lane, r, mask=r != 0)            # never stores: keeps the instruction from being dropped


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """The bulk prefetch needs a GPU of compute capability 9.0 or above, and real hardware."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device) >= (9, 0))


@functools.lru_cache(maxsize=None)
def _sink(device: torch.device) -> torch.Tensor:
    return torch.zeros(LANES, dtype=torch.int32, device=device)


def prefetch_span(tensor: torch.Tensor, nbytes: int) -> int:
    """The bytes ``l2_prefetch`` asks for: ``nbytes`` of ``tensor`` rounded down to whole chunks."""
    return min(nbytes, tensor.numel() * tensor.element_size()) // CHUNK * CHUNK


def l2_prefetch(tensor: torch.Tensor, nbytes: int) -> int:
    """Ask the L2 for the first ``nbytes`` of contiguous ``tensor``; returns the bytes asked for (0 where the
    GPU cannot: see ``supported``)."""
    span = prefetch_span(tensor, nbytes)
    if span == 0 or not supported(tensor.device):
        return 0
    assert tensor.is_contiguous(), "l2_prefetch reads a contiguous span"
    pieces = span // CHUNK
    sink = _sink(tensor.device)
    l2_prefetch_kernel[(triton.cdiv(pieces, LANES),)](tensor, span, sink, CHUNK=CHUNK, LANES=LANES, num_warps=4)
    return span
