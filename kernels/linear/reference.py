"""What the fused linear computes, in the order the HF Qwen2 layer computes it (each step rounded to the
activation dtype where HF rounds): optional RMSNorm of the input, the projection, then bias, SwiGLU over the
gate/up halves, and the residual add. ``row_rms``: the RMSNorm without a gain (folded into ``weight``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdllm_kernels.rms_norm.reference import rms_norm_ref, row_rstd_ref
from fastdllm_kernels.rope.reference import finish_projection_ref, rope_ref
from fastdllm_kernels.swiglu.reference import swiglu_ref


def fused_linear_ref(x, weight, *, norm_weight=None, row_rms: bool = False, eps: float = 1e-6, bias=None,
                     swiglu: bool = False, residual=None, out_dtype=None):
    """x [M, K]; weight [N, K] (``[2F, K]`` gate rows then up rows when ``swiglu``); returns [M, N or F]."""
    h = rms_norm_ref(x, norm_weight, eps) if norm_weight is not None or row_rms else x
    y = F.linear(h, weight, bias)
    if swiglu:
        y = swiglu_ref(y)
    if residual is not None:
        y = residual + y
    return y if out_dtype is None else y.to(out_dtype)


def qkv_rope_write_ref(x, weight, bias, eps, n_heads: int, n_kv_heads: int, cos_table, sin_table, positions, dest,
                       slots, prefix_k, prefix_v, block_k, block_v):
    """What a decode layer computes from its input to its attention's q, k, v (``qkv_rope.qkv_rope_write``):
    the QKV projection of the un-normalised x (its RMSNorm gain folded into ``weight``), each row scaled by x's
    1/rms, the bias added, rounded, q and k rotated (rotate-half RoPE at ``positions``), and k/v written to the
    prefix cache (``dest`` 1, at the position) or the block cache (2, at the position modulo the block size).
    In x's dtype the projection is rounded first, as the two-kernel path (cuBLAS, then the RoPE kernel) does."""
    T = x.shape[0]
    D = weight.shape[0] // (n_heads + 2 * n_kv_heads)
    raw = F.linear(x, weight)
    r = row_rstd_ref(x, eps)
    parts = [n_heads * D, n_kv_heads * D, n_kv_heads * D]
    biases = (None, None, None) if bias is None else bias.split(parts)
    q, k, v = (finish_projection_ref(t.reshape(T, -1, D), r, b)
               for t, b in zip(raw.split(parts, dim=-1), biases))
    c, s = cos_table[positions].to(x.dtype), sin_table[positions].to(x.dtype)
    q, k = rope_ref(q, c, s), rope_ref(k, c, s)
    block_size = block_k.shape[2]
    for t in range(T):
        slot, pos = int(slots[t]), int(positions[t])
        if int(dest[t]) == 1:
            prefix_k[slot, :, pos], prefix_v[slot, :, pos] = k[t], v[t]
        elif int(dest[t]) == 2:
            block_k[slot, :, pos % block_size], block_v[slot, :, pos % block_size] = k[t], v[t]
    return torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
