"""Fused (residual add +) RMSNorm: one program per token row.

out = weight * cast(x32 * rsqrt(mean(x32^2) + eps)), with x32 = fp32(residual + x) and the sum rounded to the
activation dtype first, exactly where the HF layer rounds (reference.py). ``weight`` None: no gain (the triton
backend folds gains into the next projection's weight)."""
import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(p_x, p_res, p_w, p_out, p_res_out, stride_x, stride_res, stride_out, stride_res_out, N,
                        eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    b_x = tl.load(p_x + row * stride_x + offs, mask=m, other=0.0)
    if HAS_RES:
        b_x = (b_x + tl.load(p_res + row * stride_res + offs, mask=m, other=0.0)).to(p_x.dtype.element_ty)
        tl.store(p_res_out + row * stride_res_out + offs, b_x, mask=m)
    b_x32 = b_x.to(tl.float32)
    var = tl.sum(b_x32 * b_x32, axis=0) / N
    b_y = (b_x32 * tl.rsqrt(var + eps)).to(p_x.dtype.element_ty)
    if HAS_W:
        b_y = tl.load(p_w + offs, mask=m, other=0.0) * b_y
    tl.store(p_out + row * stride_out + offs, b_y.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def row_rstd(p_x, row, stride_x, D, eps, BLOCK_D: tl.constexpr):
    """1 / RMS of row ``row`` of x [*, D] in fp32, the whole row in one load (BLOCK_D >= D: a loop over
    chunks costs a memory latency per chunk in these latency-bound kernels): for kernels that consume the
    projection of an un-normalised row whose RMSNorm gain is folded into the weight (``row_rstd_ref``)."""
    d = tl.arange(0, BLOCK_D)
    b_x = tl.load(p_x + row * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(b_x * b_x, axis=0) / D + eps)


def _check(x, weight):
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [T, D] with unit last stride, got {tuple(x.shape)}"
    assert weight is None or weight.shape == (x.shape[1],), \
        f"weight {tuple(weight.shape)} does not match D={x.shape[1]}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check(x, weight)
    out = torch.empty_like(x)
    if x.shape[0]:
        rms_norm_fwd_kernel[(x.shape[0],)](x, x, x if weight is None else weight, out, out, x.stride(0), 0,
                                           out.stride(0), 0, x.shape[1], eps, HAS_RES=False,
                                           HAS_W=weight is not None, BLOCK=triton.next_power_of_2(x.shape[1]),
                                           num_warps=8 if x.shape[1] >= 2048 else 4)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(residual + x), residual + x)."""
    _check(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    if x.shape[0]:
        rms_norm_fwd_kernel[(x.shape[0],)](x, residual, weight, out, res_out, x.stride(0), residual.stride(0),
                                           out.stride(0), res_out.stride(0), x.shape[1], eps, HAS_RES=True, HAS_W=True,
                                           BLOCK=triton.next_power_of_2(x.shape[1]),
                                           num_warps=8 if x.shape[1] >= 2048 else 4)
    return out, res_out
