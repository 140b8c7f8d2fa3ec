"""Per-row statistics of a logits matrix: (max, argmax, logsumexp), and the sampler's greedy choice.

A decode step has few logits rows (8 per sequence) of ~152k columns. One program per row - PyTorch's softmax
and reductions at this shape, and this module's first version - streams 600 KB through a single SM one load
latency at a time: 170-320 us between the end of a step's forward and its choice on the host (device runs 67-70,
bench/sampler_host.py), 3-5 % of a 7B batch-1 step with the GPU idle. Here each row is split into chunks of
``CHUNK`` columns, one program each (an online softmax per lane, as in flash attention), and a second kernel
merges a row's chunks.

``choice_stats`` packs what the sampler needs into one float64 [3, N] tensor - the largest softmax probability
1 / sum(exp(x - max)), the first column holding the max, and whether both are finite - so the host copies it
in one transfer; ``token_logp`` packs what the scorer needs the same way (log p of a given token, whether it is
the argmax, whether finite)."""
import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def logit_partials_kernel(p_x, p_m, p_s, p_i, stride_x, V, S, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [c * CHUNK, (c + 1) * CHUNK) of row r: their max, sum of exp(x - max) and first argmax."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    b_m = tl.full([BLOCK], float("-inf"), tl.float32)        # running max per lane
    b_s = tl.zeros([BLOCK], tl.float32)                      # running sum of exp(x - m) per lane
    b_i = tl.zeros([BLOCK], tl.int64)                        # first index of the lane max
    for start in range(c * CHUNK, (c + 1) * CHUNK, BLOCK):
        col = start + offs
        b_x = tl.load(p_x + r * stride_x + col, mask=col < V, other=float("-inf")).to(tl.float32)
        better = b_x > b_m
        new_m = tl.maximum(b_m, b_x)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)   # lanes that saw only -inf so far
        b_s = b_s * tl.exp(b_m - safe_m) + tl.exp(b_x - safe_m)
        b_i = tl.where(better, col.to(tl.int64), b_i)
        b_m = new_m
    m = tl.max(b_m, axis=0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(b_s * tl.exp(b_m - safe), axis=0)
    # the first column holding the maximum: smallest index among lanes whose max equals m
    big = tl.full([BLOCK], 9223372036854775807, tl.int64)
    idx = tl.min(tl.where(b_m == m, b_i, big), axis=0)
    tl.store(p_m + r * S + c, m)
    tl.store(p_s + r * S + c, s)
    tl.store(p_i + r * S + c, idx)


@triton.jit
def logit_merge_kernel(p_m, p_s, p_i, p_mx, p_idx, p_lse, p_choice, N, S, S_P2: tl.constexpr,
                       CHOICE: tl.constexpr):
    """Merge row r's S chunk statistics: (max, argmax, lse), or under CHOICE the packed greedy choice."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, S_P2)
    ok = c < S
    b_m = tl.load(p_m + r * S + c, mask=ok, other=float("-inf"))
    b_s = tl.load(p_s + r * S + c, mask=ok, other=0.0)
    b_i = tl.load(p_i + r * S + c, mask=ok, other=9223372036854775807)
    m = tl.max(b_m, axis=0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(ok, b_s * tl.exp(b_m - safe), 0.0), axis=0)
    big = tl.full([S_P2], 9223372036854775807, tl.int64)
    idx = tl.min(tl.where(ok & (b_m == m), b_i, big), axis=0)       # chunks are in column order
    if CHOICE:
        conf = 1.0 / s                                               # softmax at the argmax: exp(0) / sum
        finite = (conf == conf) & (tl.abs(conf) < float("inf")) & (m == m) & (tl.abs(m) < float("inf"))
        tl.store(p_choice + r, conf.to(tl.float64))
        tl.store(p_choice + N + r, idx.to(tl.float64))
        tl.store(p_choice + 2 * N + r, tl.where(finite, 1.0, 0.0).to(tl.float64))
    else:
        tl.store(p_mx + r, m)
        tl.store(p_idx + r, idx)
        tl.store(p_lse + r, m + tl.log(s))


def _partials(logits: torch.Tensor):
    assert logits.dim() == 2 and logits.stride(-1) == 1, tuple(logits.shape)
    N, V = logits.shape
    S = triton.cdiv(V, CHUNK)
    m = torch.empty(N, S, dtype=torch.float32, device=logits.device)
    s = torch.empty(N, S, dtype=torch.float32, device=logits.device)
    i = torch.empty(N, S, dtype=torch.int64, device=logits.device)
    if N:
        logit_partials_kernel[(N, S)](logits, m, s, i, logits.stride(0), V, S, CHUNK=CHUNK, BLOCK=1024,
                                      num_warps=4)
    return m, s, i, S


def logit_stats(logits: torch.Tensor):
    """(max, argmax, logsumexp) of each row of ``logits`` [N, V]; see ``reference.logit_stats_ref``."""
    N = logits.shape[0]
    m, s, i, S = _partials(logits)
    mx = torch.empty(N, dtype=torch.float32, device=logits.device)
    idx = torch.empty(N, dtype=torch.int64, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        logit_merge_kernel[(N,)](m, s, i, mx, idx, lse, mx, N, S, S_P2=triton.next_power_of_2(S), CHOICE=False)
    return mx, idx, lse


def choice_stats(logits: torch.Tensor) -> torch.Tensor:
    """float64 [3, N]: each row's largest softmax probability, its first argmax, and 1.0 where both are finite
    (0.0 otherwise); see ``reference.choice_stats_ref``."""
    N = logits.shape[0]
    m, s, i, S = _partials(logits)
    out = torch.empty(3, N, dtype=torch.float64, device=logits.device)
    if N:
        logit_merge_kernel[(N,)](m, s, i, m, i, m, out, N, S, S_P2=triton.next_power_of_2(S), CHOICE=True)
    return out


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float64 [3, N]: log p(tokens[i]) under row i's softmax, 1.0 where tokens[i] is the row's first argmax,
    and 1.0 where the log-probability is finite; see ``reference.token_logp_ref``."""
    mx, idx, lse = logit_stats(logits)
    logp = logits.gather(-1, tokens[:, None]).squeeze(-1).float() - lse
    return torch.stack([logp.double(), (idx == tokens).double(), torch.isfinite(logp).double()])
