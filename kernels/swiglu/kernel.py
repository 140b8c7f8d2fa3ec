"""SwiGLU on the fused gate/up projection output: out = silu(gate) * up, rounded where the HF MLP rounds
(silu result to the activation dtype, then the product).

With ``rms_of`` (the projection's input, un-normalised, its RMSNorm gain folded into the weight) each row is
first scaled by that input row's 1/rms: the gate/up projection then needs no RMSNorm kernel before it."""
import torch
import triton
import triton.language as tl

from fastdllm_kernels.rms_norm.kernel import row_rstd


@triton.jit
def swiglu_fwd_kernel(p_gu, p_out, p_x, stride_gu, stride_out, stride_x, F, D, eps, ROW_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    b_g = tl.load(p_gu + row * stride_gu + col, mask=m, other=0.0)
    b_u = tl.load(p_gu + row * stride_gu + F + col, mask=m, other=0.0)
    if ROW_SCALE:
        r = row_rstd(p_x, row, stride_x, D, eps, BLOCK_D)
        b_g = (b_g.to(tl.float32) * r).to(p_gu.dtype.element_ty)
        b_u = (b_u.to(tl.float32) * r).to(p_gu.dtype.element_ty)
    b_g = b_g.to(tl.float32)
    b_act = (b_g * tl.sigmoid(b_g)).to(p_gu.dtype.element_ty)
    tl.store(p_out + row * stride_out + col, (b_act * b_u).to(p_out.dtype.element_ty), mask=m)


def swiglu(gate_up: torch.Tensor, rms_of: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """gate_up [T, 2F]; ``rms_of`` [T, D]: scale row t by 1/rms(rms_of[t]) first (``reference.swiglu_ref``
    with ``row_scale = row_rstd_ref(rms_of, eps)``)."""
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(-1) == 1, tuple(gate_up.shape)
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    if rms_of is not None:
        assert rms_of.dim() == 2 and rms_of.shape[0] == T and rms_of.stride(-1) == 1, (tuple(rms_of.shape), T)
    out = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    if T:
        x = gate_up if rms_of is None else rms_of
        swiglu_fwd_kernel[(T, triton.cdiv(F, BLOCK))](
            gate_up, out, x, gate_up.stride(0), out.stride(0), x.stride(0), F, x.shape[1], eps,
            ROW_SCALE=rms_of is not None, BLOCK=BLOCK, BLOCK_D=triton.next_power_of_2(x.shape[1]),
            num_warps=4)
    return out
