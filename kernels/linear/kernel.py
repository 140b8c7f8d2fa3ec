"""A linear layer for the decode step's few tokens (M <= 64), streaming the weight once at full bandwidth.

At batch 1 a step multiplies 8 or 32 tokens by every weight of the model, so its time is the weight read.
cuBLAS reaches ~2.6 TB/s at these shapes on an H100 and every norm, bias, activation and residual add around
it is another launch. This kernel fuses what surrounds the matmul:

* prologue: RMSNorm of the input. The weight ``gamma`` multiplies the input tile as it is loaded and the
  row's ``1/rms`` scales the accumulator at the end (the sum of squares accumulates over the same K tiles the
  dot product reads, so the norm costs no extra pass). With ``row_rms`` the gain is already folded into the
  weight and only the sum of squares rides along;
* epilogue: bias, SwiGLU (gate and up columns of one tile are two accumulators, so the [M, 2F] activation is
  never written), residual add, and the output dtype (fp32 logits straight from the head).

Swapped operands (``LinearConfig.swap_ab``): the tile is computed as ``W_tile @ x.T`` and transposed back before
the split reduction and epilogue. With 8-32 tokens as the MMA's left operand Triton emits Hopper's mma.sync
(rows padded to 16); with a weight tile of 64+ rows on the left it emits the asynchronous warpgroup MMA, which
reads the weight straight from shared memory. Measured on an H100 (``python -m fastdllm_kernels.linear.sweep``): O and
down 0.3-1.9 us faster per call, gate/up not; the table picks per shape. Not with the row norm in the
prologue (the rows' sums of squares came out wrong on the H100 - fused_linear refuses it).

Split-K: when the output has too few column tiles to occupy every SM, the K range is split across programs.
Each split stores its partial tile (and partial sums of squares) to a workspace and bumps a per-tile counter;
the split that arrives last sums all partials in split order - deterministic - runs the epilogue, and resets
the counter to zero, so the next call (or CUDA-graph replay) starts clean without a memset. The counters are
one buffer per device: calls must not run concurrently on two streams (the runtime issues them on one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LinearConfig, device_name, pick_config

_COUNTERS: dict = {}
MAX_TILES = 1 << 16


@triton.jit
def _dot_rows(x, w, acc, SWAP_AB: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += x @ w.T, or with swapped operands (the weight tile on the MMA's left, module docstring) its
    transpose: acc [BLOCK_N, BLOCK_M] += w @ x.T."""
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _partial_tile(p_x, p_w, p_gamma, rm, rn, m_ok, n_ok, k_lo, K, PAIR_OFFSET, stride_xm, stride_wn,
                  K_PER_SPLIT, NORM: tl.constexpr, GAMMA: tl.constexpr, PAIRED: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
                  SWAP_AB: tl.constexpr = False):
    """x[rm, k_lo:k_lo+K_PER_SPLIT] @ W[rn, same]^T, and under PAIRED the same with the rows rn + PAIR_OFFSET
    as a second accumulator (SwiGLU's up rows; RoPE's rotation partners), with the sum of squares of the x rows
    over the same range (under NORM; the gain ``gamma`` multiplies each x tile after its squares are taken,
    under GAMMA)."""
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = p_x + rm[:, None].to(tl.int64) * stride_xm + (k_lo + rk)[None, :]
    w_ptrs = p_w + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
    u_ptrs = w_ptrs + PAIR_OFFSET * stride_wn
    ACC_ROWS: tl.constexpr = BLOCK_N if SWAP_AB else BLOCK_M
    ACC_COLS: tl.constexpr = BLOCK_M if SWAP_AB else BLOCK_N
    acc = tl.zeros([ACC_ROWS, ACC_COLS], tl.float32)
    acc_u = tl.zeros([ACC_ROWS, ACC_COLS], tl.float32)
    gram = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = (k_lo + k0 + rk) < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if NORM:
            # the rows' sums of squares are the diagonal of x @ x.T, on the tensor cores from the tile the dot
            # reads anyway (summing x * x in registers made the 7B gate/up at 32 tokens 119.7 us against
            # 104.7 for a norm kernel + this kernel on an H100; with the Gram tile 103.0)
            gram = tl.dot(x, tl.trans(x), gram, input_precision=DOT_PREC)
        if GAMMA:
            if EVEN_K:
                g = tl.load(p_gamma + k_lo + k0 + rk)
            else:
                g = tl.load(p_gamma + k_lo + k0 + rk, mask=(k_lo + k0 + rk) < K, other=0.0)
            x = (x.to(tl.float32) * g.to(tl.float32)).to(w.dtype)
        acc = _dot_rows(x, w, acc, SWAP_AB, DOT_PREC)
        if PAIRED:
            if EVEN_K:
                u = tl.load(u_ptrs, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                u = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc_u = _dot_rows(x, u, acc_u, SWAP_AB, DOT_PREC)
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    ss = tl.zeros([BLOCK_M], tl.float32)
    if NORM:
        i = tl.arange(0, BLOCK_M)
        ss = tl.sum(tl.where(i[:, None] == i[None, :], gram, 0.0), axis=1)
    if SWAP_AB:
        out, out_u = tl.trans(acc), tl.trans(acc_u)
    else:
        out, out_u = acc, acc_u
    return out, out_u, ss


@triton.jit
def _reduce_splits(acc, acc_u, ss, p_ws, p_ss, p_count, tile, pid_k, SPLIT_K, NORM: tl.constexpr,
                   PAIRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K: store this split's partial tile (and sums of squares) and count its arrival; returns
    ``(last, acc, acc_u, ss)`` where ``last`` is true in the split that arrived last - which then holds the
    sums over every split, added in split order (deterministic), and has reset the tile's counter."""
    tile_elems = BLOCK_M * BLOCK_N * (2 if PAIRED else 1)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ws = p_ws + tile.to(tl.int64) * SPLIT_K * tile_elems
    tl.store(ws + pid_k * tile_elems + offs, acc)
    if PAIRED:
        tl.store(ws + pid_k * tile_elems + BLOCK_M * BLOCK_N + offs, acc_u)
    if NORM:
        tl.store(p_ss + (tile * SPLIT_K + pid_k) * BLOCK_M + tl.arange(0, BLOCK_M), ss)
    tl.debug_barrier()                           # every thread's partial is written before the release
    arrived = tl.atomic_add(p_count + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_M], tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(ws + s * tile_elems + offs, cache_modifier=".cg")
            if PAIRED:
                acc_u += tl.load(ws + s * tile_elems + BLOCK_M * BLOCK_N + offs, cache_modifier=".cg")
            if NORM:
                ss += tl.load(p_ss + (tile * SPLIT_K + s) * BLOCK_M + tl.arange(0, BLOCK_M), cache_modifier=".cg")
        tl.atomic_xchg(p_count + tile, 0)
    return last, acc, acc_u, ss


# M and the split are runtime values (one compiled kernel serves every token count and split; K_PER_SPLIT is
# specialised on divisibility by 16 as usual, which keeps the weight loads vectorised)
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def fused_linear_kernel(
        p_x, p_w, p_out, p_gamma, p_bias, p_res, p_ws, p_ss, p_count,
        M, N, K, stride_xm, stride_wn, stride_om, stride_rm, eps,
        K_PER_SPLIT, SPLIT_K, NORM: tl.constexpr, GAMMA: tl.constexpr, BIAS: tl.constexpr,
        SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
        SWAP_AB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc, acc_u, ss = _partial_tile(p_x, p_w, p_gamma, rm, rn, m_ok, n_ok, pid_k * K_PER_SPLIT, K, N,
                                   stride_xm, stride_wn, K_PER_SPLIT, NORM, GAMMA, SWIGLU, EVEN_K,
                                   BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC, SWAP_AB)
    last = SPLIT_K == 1                         # with split-K, only the split that arrives last finishes
    if SPLIT_K > 1:
        last, acc, acc_u, ss = _reduce_splits(acc, acc_u, ss, p_ws, p_ss, p_count, pid_m * tl.num_programs(0) + pid_n,
                                              pid_k, SPLIT_K, NORM, SWIGLU, BLOCK_M, BLOCK_N)
    if last:
        _epilogue(acc, acc_u, ss, rm, rn, m_ok, n_ok, p_out, p_bias, p_res, K, stride_om, stride_rm, eps,
                  NORM, BIAS, SWIGLU, RESIDUAL)


@triton.jit
def _epilogue(acc, acc_u, ss, rm, rn, m_ok, n_ok, p_out, p_bias, p_res, K, stride_om, stride_rm, eps,
              NORM: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    if NORM:
        rstd = tl.rsqrt(ss / K + eps)
        acc = acc * rstd[:, None]
        acc_u = acc_u * rstd[:, None]
    if BIAS:
        acc += tl.load(p_bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_u
    mask = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        acc += tl.load(p_res + rm[:, None].to(tl.int64) * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(p_out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(p_out.dtype.element_ty), mask=mask)


def _counters(device) -> torch.Tensor:
    """Per-device split-K arrival counters (zero between calls: the last split of each tile resets its own).
    Allocated by the first call, which must not be inside a CUDA-graph capture (the runtime warms up first)."""
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused_linear: run one eager call before capturing a CUDA graph "
                               "(its split-K counters must outlive the graph)")
        c = _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return c


def _f32_dummy(device) -> torch.Tensor:
    key = ("f32", device.type, device.index)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _COUNTERS[key]


def k_split(K: int, cfg: LinearConfig):
    """(K per split - a multiple of the K tile, split count, whether every K tile is whole) for ``cfg``."""
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(K, k_per_split)
    return k_per_split, split_k, K % cfg.block_k == 0 and k_per_split * split_k == K


def split_workspace(tiles: int, split_k: int, cfg: LinearConfig, paired: bool, device):
    """The split-K partial tiles and partial sums of squares (fp32; a dummy when the K range is not split)."""
    if split_k == 1:
        dummy = _f32_dummy(device)
        return dummy, dummy
    assert tiles <= MAX_TILES, f"fused_linear: {tiles} output tiles exceed {MAX_TILES}"
    ws = torch.empty(tiles * split_k * cfg.block_m * cfg.block_n * (2 if paired else 1), dtype=torch.float32,
                     device=device)
    return ws, torch.empty(tiles * split_k * cfg.block_m, dtype=torch.float32, device=device)


def fused_linear(x, weight, *, norm_weight=None, row_rms: bool = False, eps: float = 1e-6, bias=None,
                 swiglu: bool = False, residual=None, out_dtype=None, config: LinearConfig | None = None,
                 num_sms: int = 132):
    """Fused ``[residual +] act(rmsnorm(x) @ weight.T + bias)``; see ``reference.fused_linear_ref``.
    ``row_rms``: normalise the rows of x without a gain (the gain is folded into ``weight``).

    x [M, K] (unit last stride); weight [N, K] contiguous rows (``[2F, K]`` gate then up under ``swiglu``)."""
    M, K = x.shape
    N = weight.shape[0] // (2 if swiglu else 1)
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[1] == K, (x.shape, weight.shape)
    assert not swiglu or weight.shape[0] % 2 == 0
    assert not (row_rms and norm_weight is not None), "row_rms means the gain is folded into the weight"
    out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = config or pick_config(M, N, K, swiglu, num_sms, device_name(x.device))
    if cfg.swap_ab and (norm_weight is not None or row_rms):
        raise ValueError(f"{cfg}: swap_ab with the row norm in the prologue - on an H100 (Triton 3.6) the rows' "
                         "sums of squares came out wrong when the Gram tile and the swapped dot read the same x "
                         "tile; normalise first (strategy norm_then_fused) or leave swap_ab off")
    m_tiles, n_tiles = triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n)
    k_per_split, split_k, even_k = k_split(K, cfg)
    dummy = out
    count = _counters(x.device)           # typed pointers even when unused: the split branch compiles anyway
    ws, ss = split_workspace(m_tiles * n_tiles, split_k, cfg, swiglu, x.device)
    if residual is not None:
        assert residual.shape == (M, N) and residual.stride(-1) == 1, (residual.shape, (M, N))
    fused_linear_kernel[(n_tiles, split_k, m_tiles)](
        x, weight, out, norm_weight if norm_weight is not None else dummy, bias if bias is not None else dummy,
        residual if residual is not None else dummy, ws, ss, count,
        M, N, K, x.stride(0), weight.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
        eps, K_PER_SPLIT=k_per_split, SPLIT_K=split_k, NORM=norm_weight is not None or row_rms,
        GAMMA=norm_weight is not None,
        BIAS=bias is not None, SWIGLU=swiglu, RESIDUAL=residual is not None, EVEN_K=even_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
