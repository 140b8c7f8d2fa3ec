"""What the fused linear computes, in the order the HF Qwen2 layer computes it (each step rounded to the
activation dtype where HF rounds): optional RMSNorm of the input, the projection, then bias, SwiGLU over the
gate/up halves, and the residual add. ``row_rms``: the RMSNorm without a gain (folded into ``weight``)."""
from __future__ import annotations

import torch.nn.functional as F

from fastdllm_kernels.rms_norm.reference import rms_norm_ref
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
