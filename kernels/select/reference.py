"""Per-row statistics of a logits matrix that decoding and scoring need, without materialising softmax:
max logit, its index (first on ties, as torch.argmax), and log-sum-exp. The sampler's confidence is
exp(max - lse) (the largest softmax probability); the scorer's log-probability of token t is logit[t] - lse."""
import torch


def logit_stats_ref(logits: torch.Tensor):
    x = logits.float()
    mx, idx = x.max(dim=-1)
    return mx, idx, torch.logsumexp(x, dim=-1)
