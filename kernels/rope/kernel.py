"""RoPE on q and k, fused with the write of the rotated k and of v into a KV cache.

One program per token: q [T, Hq, D] and k [T, Hkv, D] are rotated in place (rotate-half convention, in fp32,
rounded once); when ``dest[t]`` is 1 the token's k/v go to the prefix cache at (slot[t], :, index[t]), when 2
to the block cache at (slot[t], :, index[t] % bs); 0 writes nothing (plain forwards)."""
import triton
import triton.language as tl

from fastdllm_kernels.launch import pdl_mode, wait_for_producer


@triton.jit
def rope_write_fwd_kernel(p_q, p_k, p_v, p_cos, p_sin, p_pos, p_dest, p_slot,
                          p_pk, p_pv, p_bk, p_bv,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_ps, stride_ph, stride_pn, stride_bs, stride_bh, stride_bn,
                          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                          BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    wait_for_producer(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(p_pos + t).to(tl.int64)
    half = D // 2
    d = tl.arange(0, D)
    rot = tl.where(d < half, d + half, d - half)              # partner index for rotate_half
    sign = tl.where(d < half, -1.0, 1.0)
    b_cos = tl.load(p_cos + pos * D + d).to(tl.float32)
    b_sin = tl.load(p_sin + pos * D + d).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    # q: [BLOCK_H, D]
    mq = (h < HQ)[:, None]
    off_q = t * stride_qt + h[:, None] * stride_qh
    b_q = tl.load(p_q + off_q + d[None, :], mask=mq, other=0.0).to(tl.float32)
    b_qr = tl.load(p_q + off_q + rot[None, :], mask=mq, other=0.0).to(tl.float32)
    tl.store(p_q + off_q + d[None, :], (b_q * b_cos[None, :] + sign[None, :] * b_qr * b_sin[None, :])
             .to(p_q.dtype.element_ty), mask=mq)
    mk = (h < HKV)[:, None]
    off_k = t * stride_kt + h[:, None] * stride_kh
    b_k = tl.load(p_k + off_k + d[None, :], mask=mk, other=0.0).to(tl.float32)
    b_kr = tl.load(p_k + off_k + rot[None, :], mask=mk, other=0.0).to(tl.float32)
    b_k = (b_k * b_cos[None, :] + sign[None, :] * b_kr * b_sin[None, :]).to(p_k.dtype.element_ty)
    tl.store(p_k + off_k + d[None, :], b_k, mask=mk)
    dest = tl.load(p_dest + t)
    if dest != 0:
        slot = tl.load(p_slot + t).to(tl.int64)
        b_v = tl.load(p_v + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mk, other=0.0)
        if dest == 1:
            off = slot * stride_ps + h[:, None] * stride_ph + pos * stride_pn + d[None, :]
            tl.store(p_pk + off, b_k.to(p_pk.dtype.element_ty), mask=mk)
            tl.store(p_pv + off, b_v.to(p_pv.dtype.element_ty), mask=mk)
        else:
            off = slot * stride_bs + h[:, None] * stride_bh + (pos % BS) * stride_bn + d[None, :]
            tl.store(p_bk + off, b_k.to(p_bk.dtype.element_ty), mask=mk)
            tl.store(p_bv + off, b_v.to(p_bv.dtype.element_ty), mask=mk)


def rope_write(q, k, v, cos_table, sin_table, positions, dest, slots, prefix_k, prefix_v, block_k, block_v):
    """q [T, Hq, D], k/v [T, Hkv, D] (q and k rotated in place); tables [max_pos, D]; positions, dest, slots
    [T]; caches [slots, Hkv, S, D] and [slots, Hkv, bs, D] (one layer)."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos_table.shape[1] == D and D % 2 == 0 and (D & (D - 1)) == 0, f"head_dim {D} must be a power of 2"
    assert positions.shape == (T,) and dest.shape == (T,) and slots.shape == (T,)
    if T == 0:
        return q, k
    pdl = pdl_mode(q.device)
    rope_write_fwd_kernel[(T,)](
        q, k, v, cos_table, sin_table, positions, dest, slots, prefix_k, prefix_v, block_k, block_v,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        block_k.stride(0), block_k.stride(1), block_k.stride(2),
        HQ=HQ, HKV=HKV, D=D, BS=block_k.shape[2], BLOCK_H=triton.next_power_of_2(max(HQ, HKV)), PDL=pdl,
        num_warps=4, launch_pdl=pdl > 0)
    return q, k
