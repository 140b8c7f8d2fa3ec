"""RoPE on q and k, fused with the write of the rotated k and of v into a KV cache.

One program per token: q [T, Hq, D] and k [T, Hkv, D] are rotated in place (rotate-half convention, in fp32,
rounded once); when ``dest[t]`` is 1 the token's k/v go to the prefix cache at (slot[t], :, index[t]), when 2
to the block cache at (slot[t], :, index[t] % block_size); 0 writes nothing (plain forwards).

``norm_input`` / ``bias``: q, k, v arrive as the raw projection of the un-normalised layer input (the input
RMSNorm's gain folded into the QKV weight); the kernel first scales each token's q, k, v by 1/rms of its
``norm_input`` row and adds the projection's bias (rounded to the activation dtype, where the projection's
output is rounded), and writes the finished v back too. The QKV projection then needs no RMSNorm kernel before
it and no bias epilogue (reference: ``reference.finish_projection_ref``)."""
import triton
import triton.language as tl

from fastdllm_kernels.rms_norm.kernel import row_rstd


@triton.jit
def _bias(p_b, off_b, mask, BIAS: tl.constexpr):
    b = tl.zeros(off_b.shape, tl.float32)           # one return type whatever BIAS (the compiler requires it)
    if BIAS:
        b = tl.load(p_b + off_b, mask=mask, other=0.0).to(tl.float32)
    return b


@triton.jit
def _finish(b, r, bias, p_b, NORM: tl.constexpr, BIAS: tl.constexpr, FINISH: tl.constexpr):
    """A raw projection tile -> fp32, scaled by the row's 1/rms, plus bias, rounded to the activation dtype."""
    b = b.to(tl.float32)
    if NORM:
        b = b * r
    if BIAS:
        b += bias
    if FINISH:
        b = b.to(p_b.dtype.element_ty).to(tl.float32)
    return b


@triton.jit
def rope_write_fwd_kernel(p_q, p_k, p_v, p_cos, p_sin, p_pos, p_dest, p_slot,
                          p_pk, p_pv, p_bk, p_bv, p_x, p_b,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn, stride_x, HIDDEN, eps,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          BLOCK_H: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr, FINISH: tl.constexpr,
                          BLOCK_X: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(p_pos + t).to(tl.int64)
    half = D // 2
    d = tl.arange(0, D)
    rot = tl.where(d < half, d + half, d - half)              # partner index for rotate_half
    sign = tl.where(d < half, -1.0, 1.0)
    h = tl.arange(0, BLOCK_H)
    mq = (h < HQ)[:, None]
    mk = (h < HKV)[:, None]
    off_q = t * stride_qt + h[:, None] * stride_qh
    off_k = t * stride_kt + h[:, None] * stride_kh
    off_v = t * stride_vt + h[:, None] * stride_vh + d[None, :]
    # every load is issued before the row's 1/rms is reduced (a reduction's barrier would otherwise hold the
    # q/k/v loads back by a memory latency)
    b_q = tl.load(p_q + off_q + d[None, :], mask=mq, other=0.0)                          # [BLOCK_H, D]
    b_qr = tl.load(p_q + off_q + rot[None, :], mask=mq, other=0.0)
    b_k = tl.load(p_k + off_k + d[None, :], mask=mk, other=0.0)
    b_kr = tl.load(p_k + off_k + rot[None, :], mask=mk, other=0.0)
    b_v = tl.load(p_v + off_v, mask=mk, other=0.0)
    b_cos = tl.load(p_cos + pos * D + d).to(tl.float32)
    b_sin = tl.load(p_sin + pos * D + d).to(tl.float32)
    c_q = _bias(p_b, h[:, None] * D + d[None, :], mq, BIAS)
    c_qr = _bias(p_b, h[:, None] * D + rot[None, :], mq, BIAS)
    c_k = _bias(p_b, (HQ + h[:, None]) * D + d[None, :], mk, BIAS)
    c_kr = _bias(p_b, (HQ + h[:, None]) * D + rot[None, :], mk, BIAS)
    c_v = _bias(p_b, (HQ + HKV + h[:, None]) * D + d[None, :], mk, BIAS)
    r = 1.0
    if NORM:
        r = row_rstd(p_x, t, stride_x, HIDDEN, eps, BLOCK_X)
    b_q = _finish(b_q, r, c_q, p_b, NORM, BIAS, FINISH)
    b_qr = _finish(b_qr, r, c_qr, p_b, NORM, BIAS, FINISH)
    tl.store(p_q + off_q + d[None, :], (b_q * b_cos[None, :] + sign[None, :] * b_qr * b_sin[None, :])
             .to(p_q.dtype.element_ty), mask=mq)
    b_k = _finish(b_k, r, c_k, p_b, NORM, BIAS, FINISH)
    b_kr = _finish(b_kr, r, c_kr, p_b, NORM, BIAS, FINISH)
    b_k = (b_k * b_cos[None, :] + sign[None, :] * b_kr * b_sin[None, :]).to(p_k.dtype.element_ty)
    tl.store(p_k + off_k + d[None, :], b_k, mask=mk)
    if FINISH:                                              # v is finished here for every token
        b_v = _finish(b_v, r, c_v, p_b, NORM, BIAS, FINISH).to(p_v.dtype.element_ty)
        tl.store(p_v + off_v, b_v, mask=mk)
    dest = tl.load(p_dest + t)
    if dest != 0:
        slot = tl.load(p_slot + t).to(tl.int64)
        if dest == 1:
            off = slot * stride_ps + h[:, None] * stride_ph + pos * stride_pn + d[None, :]
            tl.store(p_pk + off, b_k.to(p_pk.dtype.element_ty), mask=mk)
            tl.store(p_pv + off, b_v.to(p_pv.dtype.element_ty), mask=mk)
        else:
            off = slot * stride_bs + h[:, None] * stride_bh + (pos % BS) * stride_bn + d[None, :]
            tl.store(p_bk + off, b_k.to(p_bk.dtype.element_ty), mask=mk)
            tl.store(p_bv + off, b_v.to(p_bv.dtype.element_ty), mask=mk)


def rope_write(q, k, v, cos_table, sin_table, positions, dest, slots, prefix_k, prefix_v, block_k, block_v,
               norm_input=None, bias=None, eps: float = 1e-6):
    """q [T, Hq, D], k/v [T, Hkv, D] (q and k rotated in place); tables [max_pos, D]; positions, dest, slots
    [T]; caches [slots, Hkv, S, D] and [slots, Hkv, block_size, D] (one layer). ``norm_input`` [T, hidden] and ``bias``
    [(Hq + 2 Hkv) D]: q, k, v are the raw projection, finished here (module docstring); v in place too."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos_table.shape[1] == D and D % 2 == 0 and (D & (D - 1)) == 0, f"head_dim {D} must be a power of 2"
    assert positions.shape == (T,) and dest.shape == (T,) and slots.shape == (T,)
    if norm_input is not None:
        assert norm_input.dim() == 2 and norm_input.shape[0] == T and norm_input.stride(-1) == 1, \
            (tuple(norm_input.shape), T)
    if bias is not None:
        assert bias.shape == ((HQ + 2 * HKV) * D,) and bias.dtype == q.dtype, (tuple(bias.shape), bias.dtype)
    if T == 0:
        return q, k
    x = q if norm_input is None else norm_input
    hidden = x.shape[-1] if norm_input is not None else 1
    rope_write_fwd_kernel[(T,)](
        q, k, v, cos_table, sin_table, positions, dest, slots, prefix_k, prefix_v, block_k, block_v,
        x, q if bias is None else bias,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        block_k.stride(0), block_k.stride(1), block_k.stride(2), x.stride(0), hidden, eps,
        HQ=HQ, HKV=HKV, D=D, BS=block_k.shape[2], BLOCK_H=triton.next_power_of_2(max(HQ, HKV)),
        NORM=norm_input is not None, BIAS=bias is not None, FINISH=norm_input is not None or bias is not None,
        BLOCK_X=triton.next_power_of_2(hidden), num_warps=4)
    return q, k
