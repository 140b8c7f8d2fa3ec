"""``linear``: a decode-step projection with its norm and epilogue, run the way ``tuned.json`` measured fastest
on this GPU (strategies in ``configs.py``). Same contract as ``reference.fused_linear_ref``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdllm_kernels.rms_norm.kernel import rms_norm
from fastdllm_kernels.swiglu.kernel import swiglu as swiglu_kernel

from .configs import FUSED_MAX_TOKENS, device_name, pick_strategy
from .kernel import fused_linear


def linear(x, weight, *, norm_weight=None, row_rms: bool = False, eps: float = 1e-6, bias=None, swiglu: bool = False,
           residual=None, out_dtype=None, strategy: str | None = None, config=None, num_sms: int = 132):
    """``row_rms``: RMS-normalise the rows of x with no gain (the gain folded into ``weight``). Under
    ``cublas`` with SwiGLU at decode sizes the normalisation is a row scale inside the SwiGLU kernel, not a
    kernel of its own; above ``FUSED_MAX_TOKENS`` (prefill, scoring) the norm kernel runs first, since every
    SwiGLU program would re-read its row (1.5B scoring measured 7 % slower that way on an H100)."""
    N = weight.shape[0] // (2 if swiglu else 1)
    strategy = strategy or pick_strategy(x.shape[0], N, x.shape[1], swiglu, device_name(x.device))
    if strategy == "fused":
        return fused_linear(x, weight, norm_weight=norm_weight, row_rms=row_rms, eps=eps, bias=bias, swiglu=swiglu,
                            residual=residual, out_dtype=out_dtype, config=config, num_sms=num_sms)
    scale_in_swiglu = strategy == "cublas" and row_rms and swiglu and bias is None and x.shape[0] <= FUSED_MAX_TOKENS
    h = rms_norm(x, norm_weight, eps) if norm_weight is not None or (row_rms and not scale_in_swiglu) else x
    if strategy == "norm_then_fused":
        return fused_linear(h, weight, bias=bias, swiglu=swiglu, residual=residual, out_dtype=out_dtype,
                            config=config, num_sms=num_sms)
    if strategy != "cublas":
        raise ValueError(f"unknown linear strategy {strategy!r}")
    if residual is not None and bias is None and not swiglu:
        y = torch.addmm(residual, h, weight.t())               # cuBLAS adds the residual in its epilogue
    else:
        y = F.linear(h, weight, bias)
        if swiglu:
            y = swiglu_kernel(y, rms_of=x if scale_in_swiglu else None, eps=eps)
        if residual is not None:
            y = residual + y
    return y if out_dtype is None else y.to(out_dtype)
