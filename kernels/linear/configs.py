"""How a decode-step linear runs on this GPU: a strategy and a ``fused_linear`` launch configuration.

Strategies (``dispatch.linear`` carries them out):

* ``fused`` - one ``fused_linear`` with the RMSNorm in its prologue;
* ``norm_then_fused`` - the RMSNorm kernel, then ``fused_linear`` for the matmul and epilogue (the prologue
  re-normalises the input tile in every program, which costs more than a launch when M is large);
* ``cublas`` - the RMSNorm kernel, cuBLAS, and the epilogue as separate kernels; with ``row_rms`` (the gain
  folded into the weight) and SwiGLU, the row's 1/rms is applied by the SwiGLU kernel instead of a norm kernel.

``tuned.json`` (written by ``python -m fastdllm_kernels.linear.sweep`` on a GPU, keyed by the GPU's name, then
``"<M bucket>,<output columns>,<K>,<swiglu>"``) holds the fastest measured strategy and configuration;
a shape without an entry for this GPU uses that of the tuned GPU of its compute capability. Shapes the table
lacks run ``fused`` with a derived configuration (a token tile covering M, 64 output columns, and enough K
splits for about two programs per SM: a weight-streaming kernel needs every SM pulling bytes) up to 32
tokens, and ``cublas`` above: the H100 sweep found the prologue norm losing to separate kernels from 32
tokens on. Above ``FUSED_MAX_TOKENS`` (prefill, scoring) a forward is compute-bound and
always takes ``cublas``."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

import torch
import triton

FUSED_MAX_TOKENS = 64
TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def m_bucket(M: int) -> int:
    return 16 if M <= 16 else 32 if M <= 32 else 64


def shape_key(M: int, N: int, K: int, swiglu: bool) -> str:
    return f"{m_bucket(M)},{N},{K},{int(swiglu)}"


def qkv_rope_key(M: int, N: int, K: int) -> str:
    """The table key of the QKV projection with its RoPE / KV-write epilogue (``qkv_rope.py``)."""
    return f"{m_bucket(M)},{N},{K},rope"


# the GPUs the table was measured on, by compute capability: a GPU of the same generation borrows their entries
TUNED_ON = {"9.0": "NVIDIA H100 80GB HBM3"}
# table name -> the tuned GPU whose entries it borrows for shapes it has none of its own (filled by device_name)
BORROWS_FROM: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def device_name(device) -> str:
    """The table key for ``device``: its own name (``"cpu"`` off the GPU). Shapes without an entry of its own
    are looked up under the tuned GPU of its compute capability (``TUNED_ON``), so a GPU tuned for some shapes
    only (an H200 sweep of the 1.5B, say) still runs the others as its generation was tuned."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    cap = "{}.{}".format(*torch.cuda.get_device_capability(device))
    if TUNED_ON.get(cap, name) != name:
        BORROWS_FROM[name] = TUNED_ON[cap]
    return name


@functools.lru_cache(maxsize=1)
def tuned_table() -> dict:
    if not os.path.exists(TUNED_PATH):
        return {}
    with open(TUNED_PATH) as f:
        return json.load(f)


def tuned_entry(gpu: str, key: str) -> dict | None:
    """``gpu``'s table entry for ``key``, else that of the GPU it borrows from, else None."""
    table = tuned_table()
    for name in (gpu, BORROWS_FROM.get(gpu)):
        if name is not None and key in table.get(name, {}):
            return table[name][key]
    return None


STRATEGIES = ("fused", "norm_then_fused", "cublas")


def _tuned(M: int, N: int, K: int, swiglu: bool, gpu: str) -> dict | None:
    return tuned_entry(gpu, shape_key(M, N, K, swiglu))


def pick_strategy(M: int, N: int, K: int, swiglu: bool = False, gpu: str = "cpu") -> str:
    if M > FUSED_MAX_TOKENS:
        return "cublas"
    tuned = _tuned(M, N, K, swiglu, gpu)
    if tuned is not None:
        return tuned["strategy"]
    return "fused" if M <= 32 else "cublas"


def pick_config(M: int, N: int, K: int, swiglu: bool = False, num_sms: int = 132, gpu: str = "cpu") -> LinearConfig:
    """The configuration tuned for the ``fused_linear`` call of the shape's strategy, else a derived one."""
    tuned = _tuned(M, N, K, swiglu, gpu)
    if tuned is not None and tuned.get("config"):
        return LinearConfig(**tuned["config"])
    bm = m_bucket(M)
    block_n, block_k = (32 if swiglu else 64), 128
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, bm)
    return LinearConfig(bm, block_n, block_k, _derived_split(K, block_k, tiles, num_sms))


def _derived_split(K: int, block_k: int, tiles: int, num_sms: int) -> int:
    """K splits for about two programs per SM, each split at least four K tiles long."""
    return max(1, min(max(1, K // (4 * block_k)), triton.cdiv(2 * num_sms, tiles)))


QKV_ROPE_STRATEGIES = ("fused", "separate")


def pick_qkv_rope(M: int, N: int, K: int, num_sms: int = 132, gpu: str = "cpu",
                  head_dim: int = 128) -> tuple[str, LinearConfig | None]:
    """How a decode step's QKV projection and RoPE run: ``fused`` (``qkv_rope_write``, with a configuration) or
    ``separate`` (``linear`` - cuBLAS on the H100 - then the RoPE kernel), as measured fastest for the shape
    (``python -m fastdllm_kernels.linear.sweep --projections qkv_rope``); untuned shapes fuse up to 32 tokens with a derived
    configuration: 32 column pairs a program (fewer for heads narrower than 64: a head's half-width must divide
    by the tile) and K splits for about two programs per SM."""
    if M > FUSED_MAX_TOKENS:
        return "separate", None
    tuned = tuned_entry(gpu, qkv_rope_key(M, N, K))
    if tuned is not None:
        return tuned["strategy"], tuned.get("config") and LinearConfig(**tuned["config"])
    if M > 32:
        return "separate", None
    return "fused", derived_qkv_rope_config(M, N, K, num_sms, head_dim)


def derived_qkv_rope_config(M: int, N: int, K: int, num_sms: int = 132, head_dim: int = 128) -> LinearConfig:
    bm, block_n, block_k = m_bucket(M), min(32, head_dim // 2), 128
    tiles = triton.cdiv(N, 2 * block_n) * triton.cdiv(M, bm)
    return LinearConfig(bm, block_n, block_k, _derived_split(K, block_k, tiles, num_sms))
