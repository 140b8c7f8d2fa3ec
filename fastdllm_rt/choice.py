"""How the sampler picks a token from a row's logits: the original's greedy confidence, or temperature with
nucleus sampling (docs/design.md, Sampling)."""
from __future__ import annotations

import torch

from .forwards import check_finite


def greedy_choice(logits: torch.Tensor, backend):
    """Confidence and argmax of every logits row, as the original's temperature-0 path defines them (the
    largest softmax probability and its index), moved to the host with their finiteness in one copy - the
    host waits for the GPU once per step. The backend computes them (``choice_stats``): the torch backend as
    the original (softmax, then max), the triton backend in one split pass over the vocabulary, where
    PyTorch's softmax and max over a 152k vocabulary would keep the GPU idle for most of a decode step."""
    if logits.numel() == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    host = backend.choice_stats(logits).cpu()
    check_finite(bool(host[2].all()), "sampling")
    return host[0], host[1].long()


def sample_top_p(logits, temperature, top_p, generator):
    """Temperature + nucleus sampling for one row's positions (without the original's row-0 defect)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    remove = sorted_p.cumsum(-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    probs = probs.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    x = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    conf = probs.gather(-1, x[:, None]).squeeze(-1)
    return x.cpu(), conf.cpu()
