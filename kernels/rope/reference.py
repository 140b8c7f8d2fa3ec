"""Rotate-half RoPE over the full head dimension; cos/sin tables are fp32 values cast to the activation dtype."""
import torch


def rope_tables(positions_max: int, head_dim: int, theta: float, dtype: torch.dtype, device=None):
    """cos, sin of shape [positions_max, head_dim], computed in fp32 as HF does and cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(positions_max, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D] in x's dtype."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def finish_projection_ref(y: torch.Tensor, row_scale: torch.Tensor | None, bias: torch.Tensor | None):
    """y: a raw projection [T, H, D] of an un-normalised input (its RMSNorm gain folded into the weight);
    row_scale [T] fp32 (``row_rstd_ref`` of the input); bias [H * D]. Returns round(y * row_scale + bias) in
    y's dtype - the q, k or v the RoPE kernel starts from."""
    out = y.float()
    if row_scale is not None:
        out = out * row_scale[:, None, None]
    if bias is not None:
        out = out + bias.float().view(1, *y.shape[1:])
    return out.to(y.dtype)
