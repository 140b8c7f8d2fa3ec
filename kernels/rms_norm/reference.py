"""RMSNorm as Qwen2 computes it: statistics in fp32, cast back to the input dtype, then the weight multiply."""
import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``residual + x`` in the activation dtype (as the HF layer adds), then RMSNorm of the sum.
    Returns ``(normed, new_residual)``."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps), summed
