"""Per-row statistics of a logits matrix that decoding and scoring need, without materialising softmax:
max logit, its index (first on ties, as torch.argmax), and log-sum-exp. The sampler's confidence is
exp(max - lse) (the largest softmax probability); the scorer's log-probability of token t is logit[t] - lse."""
import torch


def logit_stats_ref(logits: torch.Tensor):
    x = logits.float()
    mx, idx = x.max(dim=-1)
    return mx, idx, torch.logsumexp(x, dim=-1)


def choice_stats_ref(logits: torch.Tensor) -> torch.Tensor:
    """The original sampler's greedy confidence (softmax, then max) packed as ``kernel.choice_stats``
    returns it: float64 [3, N] of the largest probability, its index (first on ties), and 1.0 where the
    probability is finite."""
    conf, idx = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return torch.stack([conf.double(), idx.double(), torch.isfinite(conf).double()])


def token_logp_ref(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The scorer's per-token statistics packed as ``kernel.token_logp`` returns them: float64 [3, N] of
    log p(tokens[i]) under row i's softmax, 1.0 where tokens[i] is the row's argmax (first on ties), and 1.0
    where the log-probability is finite."""
    x = logits.float()
    logp = x.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return torch.stack([logp.double(), (x.argmax(-1) == tokens).double(), torch.isfinite(logp).double()])
