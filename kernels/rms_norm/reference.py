"""RMSNorm as Qwen2 computes it: statistics in fp32, cast back to the input dtype, then the weight multiply."""
import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight`` None: no gain (the triton backend folds the gain into the next projection's weight)."""
    x32 = x.float() * row_rstd_ref(x, eps)[..., None]
    return x32.to(x.dtype) if weight is None else weight * x32.to(x.dtype)


def row_rstd_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS over the last dimension of ``x``, in fp32 (what a consumer of an un-normalised projection
    scales its rows by when the norm's gain is folded into the projection's weight)."""
    x32 = x.float()
    return torch.rsqrt(x32.pow(2).mean(-1) + eps)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``residual + x`` in the activation dtype (as the HF layer adds), then RMSNorm of the sum.
    Returns ``(normed, new_residual)``."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps), summed
