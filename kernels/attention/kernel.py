"""Block-diffusion attention in Triton.

``decode_attention`` serves the three decode kinds. For a block-aligned 32-token window (full-block, commit)
and for an 8-token sub-block window, every query sees every key: the row's prefix cache ``[0, L)`` followed,
when ``has_tail``, by the 32 keys of its block cache (the window's fresh K/V are written to
the caches before the call). Split and tile counts are runtime arguments, so batches of any size share one
compiled kernel per head layout. The G query heads that share a KV head and the window's queries are packed into
one tile of ``G * n`` rows, so each K/V tile is loaded once for all of them, and the key range is split
across programs (flash-decoding) with a second kernel combining the partial softmaxes. Lengths are read on
the device, and the grid depends only on the cache size, so the call can be captured in a CUDA graph.

``prefill_attention`` serves windows that span blocks (prefill, plain scoring forwards): keys are the
prefix cache ``[0, start)`` (all visible) and the window's own keys under the block-causal rule
``q // block_size >= k // block_size``; one program per (row, query head, 64 queries).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_update(b_s, b_v, b_m, b_l, b_acc, DOT_PREC: tl.constexpr):
    """One key tile of a flash-attention loop: fold scores ``b_s`` [M, N] and values ``b_v`` [N, D] into the
    running max ``b_m``, normaliser ``b_l`` and unnormalised output ``b_acc``."""
    new_m = tl.maximum(b_m, tl.max(b_s, axis=1))
    alpha = tl.exp(b_m - new_m)
    b_p = tl.exp(b_s - new_m[:, None])
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
    return new_m, b_l, b_acc


@triton.jit
def _attend_keys(b_q, p_k, p_v, base, stride_n, j_lo, j_hi, j_off, d, b_m, b_l, b_acc, scale,
                 BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold keys [j_lo, j_hi) of one cache (key j at cache row j - j_off) into the running softmax."""
    for j0 in range(j_lo, j_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < j_hi
        off = base + (j - j_off)[:, None] * stride_n + d[None, :]
        b_k = tl.load(p_k + off, mask=ok[:, None], other=0.0)                              # [BLOCK_N, D]
        b_v = tl.load(p_v + off, mask=ok[:, None], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale                # [BLOCK_M, BLOCK_N]
        b_s = tl.where(ok[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _online_softmax_update(b_s, b_v, b_m, b_l, b_acc, DOT_PREC)
    return b_m, b_l, b_acc


# tile and split counts change from batch to batch: keep them unspecialised so that a new batch size does not
# compile a new kernel (Triton otherwise specialises integers equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["M_TILES", "SPLITS"])
def decode_attention_fwd_kernel(
        p_q, p_pk, p_pv, p_bk, p_bv, p_o, p_part_o, p_part_lse,
        p_slot, p_plen, p_tail, p_qstart,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn,
        scale, M_TILES, SPLITS,
        HKV: tl.constexpr, G: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr, TAIL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_rh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = (pid_rh // HKV).to(tl.int64)
    h = (pid_rh % HKV).to(tl.int64)
    slot = tl.load(p_slot + r).to(tl.int64)
    L = tl.load(p_plen + r).to(tl.int64)
    K = L + tl.load(p_tail + r).to(tl.int64) * TAIL
    qstart = tl.load(p_qstart + r).to(tl.int64)
    # this row's keys split evenly (in whole tiles) over the SPLITS programs: every split works whatever the
    # cache size, and the grid still depends on sizes only
    chunk = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_N) * BLOCK_N
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, K)
    pre_base = slot * stride_ps + h * stride_ph
    tail_base = slot * stride_bs + h * stride_bh
    m_idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)           # packed rows: m = g * NQ + i
    m_ok = m_idx < G * NQ
    g = m_idx // NQ
    i = m_idx % NQ
    d = tl.arange(0, D)
    off_q = (qstart + i)[:, None] * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :]
    b_q = tl.load(p_q + off_q, mask=m_ok[:, None], other=0.0)                          # [BLOCK_M, D]
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    # two loops, prefix keys then block-cache keys, so that each K/V load feeds its dot directly: Triton
    # pipelines such loads (asynchronous copies NUM_STAGES tiles ahead); one loop summing a masked prefix
    # load and a masked tail load was not pipelined and waited a full memory latency per key tile
    b_m, b_l, b_acc = _attend_keys(b_q, p_pk, p_pv, pre_base, stride_pn, lo, tl.minimum(hi, L), 0, d,
                                   b_m, b_l, b_acc, scale, BLOCK_N, DOT_PREC)
    b_m, b_l, b_acc = _attend_keys(b_q, p_bk, p_bv, tail_base, stride_bn, tl.maximum(lo, L), hi, L, d,
                                   b_m, b_l, b_acc, scale, BLOCK_N, DOT_PREC)             # keys L.. : block cache
    if SPLITS == 1:
        off_o = (qstart + i)[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :]
        tl.store(p_o + off_o, (b_acc / b_l[:, None]).to(p_o.dtype.element_ty), mask=m_ok[:, None])
    else:
        # a split's partial: its normalised output in the activation dtype (half the bytes of the fp32
        # accumulator; rounding it costs what rounding the final output costs) and its log-sum-exp in fp32
        # (-inf for a split with no keys, which then weighs nothing in the merge)
        base = ((pid_rh * M_TILES + pid_m) * SPLITS + pid_s).to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        empty = b_l == 0.0
        b_l = tl.where(empty, 1.0, b_l)
        b_o = b_acc / b_l[:, None]
        tl.store(p_part_o + base * BLOCK_M * D + rows[:, None] * D + d[None, :], b_o.to(p_part_o.dtype.element_ty))
        tl.store(p_part_lse + base * BLOCK_M + rows, tl.where(empty, float("-inf"), b_m + tl.log(b_l)))


@triton.jit(do_not_specialize=["M_TILES", "SPLITS"])
def decode_attention_combine_kernel(
        p_o, p_part_o, p_part_lse, p_qstart, stride_ot, stride_oh, M_TILES, SPLITS,
        HKV: tl.constexpr, G: tl.constexpr, NQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
        ROWS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Merge the splits' partial softmaxes for ROWS packed rows; all splits are loaded at once (one memory
    latency, not one per split)."""
    pid_rh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    r = (pid_rh // HKV).to(tl.int64)
    h = (pid_rh % HKV).to(tl.int64)
    qstart = tl.load(p_qstart + r).to(tl.int64)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    m_idx = pid_m * BLOCK_M + rows
    m_ok = m_idx < G * NQ
    g = m_idx // NQ
    i = m_idx % NQ
    d = tl.arange(0, D)
    s = tl.arange(0, SPLITS_P2)
    s_ok = s < SPLITS
    base = ((pid_rh * M_TILES + pid_m) * SPLITS + s).to(tl.int64)                      # [S]
    b_lse = tl.load(p_part_lse + base[:, None] * BLOCK_M + rows[None, :], mask=s_ok[:, None], other=float("-inf"))
    b_os = tl.load(p_part_o + base[:, None, None] * BLOCK_M * D + rows[None, :, None] * D + d[None, None, :],
                   mask=s_ok[:, None, None], other=0.0).to(tl.float32)                     # [S, ROWS, D]
    b_max = tl.max(b_lse, axis=0)
    w = tl.where(b_lse == float("-inf"), 0.0, tl.exp(b_lse - b_max[None, :]))            # empty splits weigh 0
    b_acc = tl.sum(w[:, :, None] * b_os, axis=0)                                          # [ROWS, D]
    off_o = (qstart + i)[:, None] * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :]
    tl.store(p_o + off_o, (b_acc / tl.sum(w, axis=0)[:, None]).to(p_o.dtype.element_ty), mask=m_ok[:, None])


def _dot_precision(q) -> str:
    """fp32 inputs get exact fp32 dots (Triton's default for fp32 is TF32 on NVIDIA GPUs)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class DecodePlan:
    block_m: int
    m_tiles: int
    splits: int
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3
    merge_rows: int = 0             # packed rows per merge program; 0: as many as keep its load at 8192 values
    merge_warps: int = 4


def decode_plan(rows: int, kv_heads: int, group: int, n_q: int, max_keys: int, num_sms: int = 132,
                block_m: int = 64, block_n: int = 32, max_splits: int = 64, **launch) -> DecodePlan:
    """Static launch shape for a decode call: tiles of ``block_m`` packed query rows and enough key splits
    for about four programs per SM (each row's keys are divided among the splits at run time), but no more
    splits than keep the partial outputs (``splits * m_tiles * block_m`` rows of D per KV head) within the
    K/V bytes they summarise: with 32 queries (224 packed rows for the 7B) the partials would otherwise
    outweigh the keys. At batch 1 the op is latency-bound - a few MB of K/V over 4 KV heads - so many short
    splits win: on an H100, key tiles of 32-64 and 16-64 splits were fastest at prefixes 2k-8k
    (bench/probes/README.md), 16 splits for the 7B's 32 queries at 2k. Depends only on sizes, never on
    the current lengths."""
    block_m = min(block_m, max(16, triton.next_power_of_2(group * n_q)))
    m_tiles = triton.cdiv(group * n_q, block_m)
    programs = rows * kv_heads * m_tiles
    splits = max(1, min(max_splits, triton.cdiv(4 * num_sms, programs), triton.cdiv(max_keys, block_n),
                        2 * max_keys // (m_tiles * block_m)))
    return DecodePlan(block_m, m_tiles, splits, block_n, **launch)


def decode_attention(q, prefix_k, prefix_v, block_k, block_v, slots, prefix_lens, has_tail, q_starts, n_q: int,
                     scale: float, out=None, num_sms: int = 132, plan: DecodePlan | None = None):
    """q [T, Hq, D] packed, row r's n_q queries at q_starts[r]; caches [slots, Hkv, S, D] / [slots, Hkv, block_size, D];
    slots, prefix_lens, has_tail, q_starts: [R] int tensors on q's device. Returns o [T, Hq, D]."""
    T, HQ, D = q.shape
    HKV = prefix_k.shape[1]
    R = slots.numel()
    TAIL = block_k.shape[2]
    assert HQ % HKV == 0 and q.stride(-1) == 1 and prefix_k.stride(-1) == 1 and block_k.stride(-1) == 1
    assert prefix_k.shape[-1] == D and (D & (D - 1)) == 0, f"head_dim {D} must be a power of 2"
    G = HQ // HKV
    out = torch.empty_like(q) if out is None else out
    if R == 0:
        return out
    plan = plan or decode_plan(R, HKV, G, n_q, prefix_k.shape[2] + TAIL, num_sms)
    block_m, m_tiles, splits, block_n = plan.block_m, plan.m_tiles, plan.splits, plan.block_n
    if splits > 1:
        part_o = torch.empty(R * HKV * m_tiles * splits * block_m * D, dtype=q.dtype, device=q.device)
        part_lse = torch.empty(R * HKV * m_tiles * splits * block_m, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    decode_attention_fwd_kernel[(R * HKV, m_tiles, splits)](
        q, prefix_k, prefix_v, block_k, block_v, out, part_o, part_lse, slots, prefix_lens, has_tail, q_starts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        block_k.stride(0), block_k.stride(1), block_k.stride(2),
        scale, m_tiles, splits, HKV=HKV, G=G, NQ=n_q, D=D, TAIL=TAIL,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PREC=_dot_precision(q),
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if splits > 1:
        splits_p2 = triton.next_power_of_2(splits)
        rows = plan.merge_rows or max(1, min(block_m, 8192 // (splits_p2 * D)))
        decode_attention_combine_kernel[(R * HKV, m_tiles, block_m // rows)](
            out, part_o, part_lse, q_starts, out.stride(0), out.stride(1), m_tiles, splits, HKV=HKV, G=G, NQ=n_q, D=D,
            BLOCK_M=block_m, ROWS=rows, SPLITS_P2=splits_p2, num_warps=plan.merge_warps)
    return out


@triton.jit
def prefill_attention_fwd_kernel(
        p_q, p_k, p_v, p_pk, p_pv, p_o, p_slot, p_start, p_cu,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_ps, stride_ph, stride_pn,
        scale, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = (pid // HQ).to(tl.int64)
    hq = (pid % HQ).to(tl.int64)
    hk = hq // G
    lo_t = tl.load(p_cu + r).to(tl.int64)
    n = tl.load(p_cu + r + 1).to(tl.int64) - lo_t
    if pid_m * BLOCK_M >= n:
        return
    start = tl.load(p_start + r).to(tl.int64)
    slot = tl.load(p_slot + r).to(tl.int64)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < n
    q_pos = start + i
    d = tl.arange(0, D)
    b_q = tl.load(p_q + (lo_t + i)[:, None] * stride_qt + hq * stride_qh + d[None, :], mask=i_ok[:, None],
                  other=0.0)
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], tl.float32)
    # prefix cache [0, start): visible to every query of the window
    for j0 in range(0, start, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < start
        off = slot * stride_ps + hk * stride_ph + j[:, None] * stride_pn + d[None, :]
        b_k = tl.load(p_pk + off, mask=ok[:, None], other=0.0)
        b_v = tl.load(p_pv + off, mask=ok[:, None], other=0.0)
        b_s = tl.where(ok[None, :], tl.dot(b_q, tl.trans(b_k.to(b_q.dtype)), input_precision=DOT_PREC) * scale,
                       float("-inf"))
        b_m, b_l, b_acc = _online_softmax_update(b_s, b_v.to(b_q.dtype), b_m, b_l, b_acc, DOT_PREC)
    # own keys: block-causal over absolute positions, up to the block end of the tile's last query
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n) - 1
    kv_end = tl.minimum(n, ((start + last) // BS + 1) * BS - start)
    for j0 in range(0, kv_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < kv_end
        off = (lo_t + j)[:, None] * stride_kt + hk * stride_kh + d[None, :]
        b_k = tl.load(p_k + off, mask=ok[:, None], other=0.0)
        b_v = tl.load(p_v + off, mask=ok[:, None], other=0.0)
        vis = ok[None, :] & (((start + j)[None, :] // BS) <= (q_pos[:, None] // BS))
        b_s = tl.where(vis, tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * scale, float("-inf"))
        b_m, b_l, b_acc = _online_softmax_update(b_s, b_v, b_m, b_l, b_acc, DOT_PREC)
    off_o = (lo_t + i)[:, None] * stride_ot + hq * stride_oh + d[None, :]
    tl.store(p_o + off_o, (b_acc / b_l[:, None]).to(p_o.dtype.element_ty), mask=i_ok[:, None])


def prefill_tile(D: int, device_type: str) -> int:
    """Query and key tile of ``prefill_attention``: 64, or 32 for head_dim > 64 under the CPU interpreter
    (whose time grows with the tile's size)."""
    return 64 if D <= 64 or device_type != "cpu" else 32


def prefill_attention(q, k, v, prefix_k, prefix_v, slots, starts, cu, max_len: int, scale: float, block_size: int):
    """q [T, Hq, D], k/v [T, Hkv, D] packed windows (row r = cu[r]:cu[r+1], first position starts[r], a block
    boundary); prefix caches [slots, Hkv, S, D]. Returns o [T, Hq, D]."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    R = slots.numel()
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and (D & (D - 1)) == 0
    out = torch.empty_like(q)
    if R == 0 or T == 0:
        return out
    BLOCK_M = BLOCK_N = prefill_tile(D, q.device.type)
    prefill_attention_fwd_kernel[(R * HQ, triton.cdiv(max_len, BLOCK_M))](
        q, k, v, prefix_k, prefix_v, out, slots, starts, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        scale, HQ=HQ, G=HQ // HKV, D=D, BS=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        DOT_PREC=_dot_precision(q), num_warps=4, num_stages=2)
    return out
