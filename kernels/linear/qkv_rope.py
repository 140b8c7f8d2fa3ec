"""The decode step's QKV projection with the RoPE kernel's work in its epilogue: one kernel instead of two.

A decode layer ran cuBLAS for QKV (the input RMSNorm's gain folded into the weight) and then the RoPE kernel
(``fastdllm_kernels.rope``), which re-read the raw projection to scale each token by its input row's 1/rms,
add the bias, rotate q and k, and write k and v to the KV cache. Both are latency-bound at batch 1 (1.5B: 5.9
and ~4 us a layer for 6.3 MB of weight, 2.1 us at the copy bandwidth), so the RoPE kernel and its kernel
boundary are worth folding into the projection:

* each program computes the columns ``d`` and their rotation partners ``d + D/2`` of one head (the paired
  accumulator ``fused_linear`` uses for SwiGLU's up rows), so rotate-half needs no data exchange;
* the row's 1/rms comes from the Gram tile of the same K loop (as ``fused_linear``'s ``row_rms``), and
  split-K partials are reduced by the last split to arrive (``_reduce_splits``);
* the finished values are rounded to the activation dtype before the rotation, where the two-kernel path
  rounds them (the projection itself is not rounded first, so the two paths differ within the dtype's tier).

Same contract as ``reference.qkv_rope_write_ref``: returns the finished ``[T, (Hq + 2 Hkv) D]`` q|k|v rows and
writes k/v to the prefix cache (``dest`` 1) or the block cache (``dest`` 2; 0 writes nothing).

Measured on an H100 (``python -m fastdllm_kernels.linear.sweep --projections qkv_rope``): 0.3-0.8 us faster a
layer than cuBLAS + the RoPE kernel at 8 tokens, a tie at 32 - the kernel is ~2-3 us slower than cuBLAS's bare
matmul, which eats most of what the RoPE kernel cost - so ``tuned.json`` fuses the 8-token shapes only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LinearConfig, derived_qkv_rope_config, device_name, pick_qkv_rope
from .kernel import _counters, _partial_tile, _reduce_splits, k_split, split_workspace


@triton.jit
def _store_kv(val, d, rm, mask, head, pos, dest, slot, p_pk, p_pv, p_bk, p_bv,
              stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn,
              HQ: tl.constexpr, HKV: tl.constexpr, BS: tl.constexpr):
    """k or v head columns ``d`` of the rows ``rm`` into the prefix (dest 1) or block (dest 2) cache; q heads
    write nothing (every mask false)."""
    h = head + 0 * d                        # as a vector: the interpreter rejects a scalar in a store mask
    is_k = ((h >= HQ) & (h < HQ + HKV))[None, :]
    is_v = (h >= HQ + HKV)[None, :]
    kv = tl.where(head >= HQ + HKV, head - HQ - HKV, head - HQ)
    off_p = slot[:, None] * stride_ps + kv * stride_ph + pos[:, None] * stride_pn + d[None, :]
    off_b = slot[:, None] * stride_bs + kv * stride_bh + (pos % BS)[:, None] * stride_bn + d[None, :]
    to_p = mask & (dest == 1)[:, None]
    to_b = mask & (dest == 2)[:, None]
    tl.store(p_pk + off_p, val.to(p_pk.dtype.element_ty), mask=to_p & is_k)
    tl.store(p_pv + off_p, val.to(p_pv.dtype.element_ty), mask=to_p & is_v)
    tl.store(p_bk + off_b, val.to(p_bk.dtype.element_ty), mask=to_b & is_k)
    tl.store(p_bv + off_b, val.to(p_bv.dtype.element_ty), mask=to_b & is_v)


@triton.jit
def _qkv_rope_epilogue(lo, hi, ss, rm, m_ok, head, d_lo, K, eps, p_b, p_out, stride_om,
                       p_cos, p_sin, p_pos, p_dest, p_slot, p_pk, p_pv, p_bk, p_bv,
                       stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       BIAS: tl.constexpr):
    # The operands are loaded here, in the program that finishes the tile, not before the K loop: held through
    # the loop, the RoPE rows cost registers, and at 32 tokens the fused kernel lost to the separate path on an
    # H100 (1.5B 9.5 against 8.9 us, 7B 20.4 against 18.6); loaded here it ties (8.9 / 8.9, 18.7 / 18.8).
    HALF: tl.constexpr = D // 2
    pos = tl.load(p_pos + rm, mask=m_ok, other=0).to(tl.int64)
    dest = tl.load(p_dest + rm, mask=m_ok, other=0)
    slot = tl.load(p_slot + rm, mask=m_ok, other=0).to(tl.int64)
    cs = p_cos + pos[:, None] * D + d_lo[None, :]
    sn = p_sin + pos[:, None] * D + d_lo[None, :]
    c_lo = tl.load(cs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    c_hi = tl.load(cs + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s_lo = tl.load(sn, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s_hi = tl.load(sn + HALF, mask=m_ok[:, None], other=0.0).to(tl.float32)
    col_lo = head * D + d_lo
    rstd = tl.rsqrt(ss / K + eps)
    lo = lo * rstd[:, None]
    hi = hi * rstd[:, None]
    if BIAS:
        lo += tl.load(p_b + col_lo).to(tl.float32)[None, :]
        hi += tl.load(p_b + col_lo + HALF).to(tl.float32)[None, :]
    dt = p_out.dtype.element_ty
    lo = lo.to(dt).to(tl.float32)                       # finished q/k/v, rounded where the RoPE kernel rounds
    hi = hi.to(dt).to(tl.float32)
    if head < HQ + HKV:                                 # q and k rotate (rotate-half); v is stored as finished
        lo, hi = lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi
    mask = m_ok[:, None]
    out = p_out + rm[:, None].to(tl.int64) * stride_om + col_lo[None, :]
    tl.store(out, lo.to(dt), mask=mask)
    tl.store(out + HALF, hi.to(dt), mask=mask)
    _store_kv(lo, d_lo, rm, mask, head, pos, dest, slot, p_pk, p_pv, p_bk, p_bv,
              stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn, HQ, HKV, BS)
    _store_kv(hi, d_lo + HALF, rm, mask, head, pos, dest, slot, p_pk, p_pv, p_bk, p_bv,
              stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn, HQ, HKV, BS)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def qkv_rope_kernel(p_x, p_w, p_b, p_out, p_ws, p_ss, p_count,
                    p_cos, p_sin, p_pos, p_dest, p_slot, p_pk, p_pv, p_bk, p_bv,
                    M, K, stride_xm, stride_wn, stride_om, eps,
                    stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn,
                    K_PER_SPLIT, SPLIT_K, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                    BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)                            # (head, chunk of BLOCK_N column pairs)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    CHUNKS: tl.constexpr = D // 2 // BLOCK_N
    head = pid_n // CHUNKS
    d_lo = (pid_n % CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = head * D + d_lo                                # weight rows; their partners are rn + D/2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n_ok = rn < (HQ + 2 * HKV) * D
    lo, hi, ss = _partial_tile(p_x, p_w, p_w, rm, rn, m_ok, n_ok, pid_k * K_PER_SPLIT, K, D // 2,
                               stride_xm, stride_wn, K_PER_SPLIT, True, False, True, EVEN_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    last = SPLIT_K == 1                         # with split-K, only the split that arrives last finishes
    if SPLIT_K > 1:
        last, lo, hi, ss = _reduce_splits(lo, hi, ss, p_ws, p_ss, p_count, pid_m * tl.num_programs(0) + pid_n,
                                          pid_k, SPLIT_K, True, True, BLOCK_M, BLOCK_N)
    if last:
        _qkv_rope_epilogue(lo, hi, ss, rm, m_ok, head, d_lo, K, eps, p_b, p_out, stride_om,
                           p_cos, p_sin, p_pos, p_dest, p_slot, p_pk, p_pv, p_bk, p_bv,
                           stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn, HQ, HKV, D, BS, BIAS)


def qkv_rope_write(x, weight, bias, eps, n_heads: int, n_kv_heads: int, cos_table, sin_table, positions, dest,
                   slots, prefix_k, prefix_v, block_k, block_v, config: LinearConfig | None = None,
                   num_sms: int = 132):
    """x [T, hidden] (the un-normalised layer input; its RMSNorm gain folded into ``weight``); weight
    [(Hq + 2 Hkv) D, hidden]; bias [(Hq + 2 Hkv) D] or None; tables [max_pos, D]; positions, dest, slots [T];
    caches [slots, Hkv, S, D] and [slots, Hkv, block_size, D] (one layer). Returns the finished q|k|v
    [T, (Hq + 2 Hkv) D] (q and k rotated) and writes k/v to the caches by ``dest`` (module docstring)."""
    T, K = x.shape
    N = weight.shape[0]
    D = N // (n_heads + 2 * n_kv_heads)
    assert D * (n_heads + 2 * n_kv_heads) == N and D % 2 == 0 and (D & (D - 1)) == 0, \
        f"qkv_rope_write: {N} rows are not {n_heads} + 2 x {n_kv_heads} heads of a power-of-2 width"
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.shape[1] == K, (x.shape, weight.shape)
    assert cos_table.shape[1] == D and positions.shape == (T,) and dest.shape == (T,) and slots.shape == (T,)
    assert bias is None or (bias.shape == (N,) and bias.dtype == x.dtype), None if bias is None else bias.shape
    for cache in (prefix_k, prefix_v, block_k, block_v):
        assert cache.stride(-1) == 1 and cache.shape[-1] == D, (tuple(cache.shape), D)
    assert prefix_v.stride() == prefix_k.stride() and block_v.stride() == block_k.stride(), \
        "k and v caches of one kind must share a layout"
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cfg = (config or pick_qkv_rope(T, N, K, num_sms, device_name(x.device), head_dim=D)[1]
           or derived_qkv_rope_config(T, N, K, num_sms, head_dim=D))      # a shape tuned to run separately
    assert (D // 2) % cfg.block_n == 0, f"block_n {cfg.block_n} must divide half the head width {D // 2}"
    if cfg.swap_ab:
        raise ValueError(f"{cfg}: qkv_rope_write has no swapped-operand tiling (its row norm rules it out - "
                         "kernels/linear/kernel.py); use swap_ab=False")
    m_tiles, n_tiles = triton.cdiv(T, cfg.block_m), N // (2 * cfg.block_n)
    k_per_split, split_k, even_k = k_split(K, cfg)
    ws, ss = split_workspace(m_tiles * n_tiles, split_k, cfg, True, x.device)
    qkv_rope_kernel[(n_tiles, split_k, m_tiles)](
        x, weight, bias if bias is not None else out, out, ws, ss, _counters(x.device),
        cos_table, sin_table, positions, dest, slots, prefix_k, prefix_v, block_k, block_v,
        T, K, x.stride(0), weight.stride(0), out.stride(0), eps,
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        block_k.stride(0), block_k.stride(1), block_k.stride(2),
        K_PER_SPLIT=k_per_split, SPLIT_K=split_k, HQ=n_heads, HKV=n_kv_heads, D=D, BS=block_k.shape[2],
        BIAS=bias is not None, EVEN_K=even_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
