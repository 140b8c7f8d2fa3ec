"""SwiGLU on the fused gate/up projection output: out = silu(gate) * up, rounded where the HF MLP rounds
(silu result to the activation dtype, then the product)."""
import torch
import triton
import triton.language as tl

from fastdllm_kernels.launch import pdl_mode, wait_for_producer


@triton.jit
def swiglu_fwd_kernel(p_gu, p_out, stride_gu, stride_out, F, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producer(PDL)
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = col < F
    b_g = tl.load(p_gu + row * stride_gu + col, mask=m, other=0.0).to(tl.float32)
    b_u = tl.load(p_gu + row * stride_gu + F + col, mask=m, other=0.0)
    b_act = (b_g * tl.sigmoid(b_g)).to(p_gu.dtype.element_ty)
    tl.store(p_out + row * stride_out + col, (b_act * b_u).to(p_out.dtype.element_ty), mask=m)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(-1) == 1, tuple(gate_up.shape)
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    if T:
        pdl = pdl_mode(gate_up.device)
        swiglu_fwd_kernel[(T, triton.cdiv(F, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), F, BLOCK=BLOCK,
                                                      PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return out
