"""The Fast-dLLM v2 training objective.

Per 32-token block a noise level ``t ~ U(0,1)`` gives ``p = (1 - eps) t + eps``; response tokens are masked with
probability ``p``; a complementary copy masks exactly the other response tokens; both copies are concatenated
along the batch. The network sees ``[x_t ; x_0]`` (length 2L, RoPE positions 0..L-1 for each half) under the
mask ``M_BD | M_OBC | M_BC``; logits of the noisy half are scored with the causal-LM loss (token shift: the
output at j-1 predicts the masked token at j), averaged over masked tokens with no 1/p reweighting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def training_mask(L: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] visibility over the concatenated noisy|clean sequence (True = may attend)."""
    i = torch.arange(2 * L, device=device)
    block = (i % L) // block_size
    noisy = i < L
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = block[:, None], block[None, :]
    m_bd = (qb == kb) & (qn == kn)                 # same block, same half: bidirectional
    m_obc = qn & ~kn & (kb < qb)                   # noisy query sees clean earlier blocks
    m_bc = ~qn & ~kn & (kb <= qb)                  # clean half is block-causal
    return m_bd | m_obc | m_bc


def complementary_noise(x0, response, mask_id: int, block_size: int, eps: float = 1e-3, generator=None):
    """x0, response: [B, L] (response: bool, where labels are kept). Returns (x_t [2B, L], labels [2B, L])."""
    B, L = x0.shape
    t = torch.rand(B, L // block_size, 1, device=x0.device, generator=generator)
    p = ((1 - eps) * t + eps).expand(-1, -1, block_size).reshape(B, L)
    m = (torch.rand(B, L, device=x0.device, generator=generator) < p) & response
    comp = ~m & response
    xt = torch.cat([x0.masked_fill(m, mask_id), x0.masked_fill(comp, mask_id)])
    labels = torch.cat([x0.masked_fill(~m, IGNORE), x0.masked_fill(~comp, IGNORE)])
    return xt, labels


def diffusion_loss(model, x0, response, mask_id: int, generator=None):
    """One training loss evaluation on a batch of clean sequences."""
    block_size = model.block_size
    B, L = x0.shape
    assert L % block_size == 0, f"sequence length {L} must be a multiple of the block size {block_size}"
    xt, labels = complementary_noise(x0, response, mask_id, block_size, generator=generator)
    inputs = torch.cat([xt, x0.repeat(2, 1)], dim=1)
    positions = torch.arange(L, device=x0.device).repeat(2)[None]
    allowed = training_mask(L, block_size, x0.device)[None]
    logits = model.forward_dense(inputs, positions, allowed, logits_slice=slice(0, L))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)
