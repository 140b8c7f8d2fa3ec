"""Per-row statistics of a logits matrix: (max, argmax, logsumexp), and the sampler's greedy choice.

A decode step has few logits rows (8 per sequence) of ~152k columns. One program per row - PyTorch's softmax
and reductions at this shape, and this module's first version - streams 600 KB through a single SM one load
latency at a time: 170-320 us between the end of a step's forward and its choice on the host on an H100, 3-5 % of a
7B batch-1 step with the GPU idle. Here each row is split into chunks of
``CHUNK`` columns, one program each loading its chunk at once, and a second kernel merges a row's chunks
(online-softmax style: each chunk's sum of exp(x - its max) rescaled to the row's max).

``choice_stats`` packs what the sampler needs into one float64 [3, N] tensor - the largest softmax probability
1 / sum(exp(x - max)), the first column holding the max, and whether both are finite - so the host copies it
in one transfer; ``token_logp`` packs what the scorer needs the same way (log p of a given token, whether it is
the argmax, whether finite)."""
import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def logit_partials_kernel(p_x, p_m, p_s, p_i, stride_x, V, S, CHUNK: tl.constexpr):
    """Columns [c * CHUNK, (c + 1) * CHUNK) of row r, loaded at once (one memory latency): their max, sum of
    exp(x - max) and first argmax."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    col = c * CHUNK + tl.arange(0, CHUNK)
    b_x = tl.load(p_x + r * stride_x + col, mask=col < V, other=float("-inf")).to(tl.float32)
    m = tl.max(b_x, axis=0)
    safe = tl.where(m == float("-inf"), 0.0, m)                 # a chunk of -inf only: sum 0, not NaN
    s = tl.sum(tl.exp(b_x - safe), axis=0)
    idx = tl.min(tl.where(b_x == m, col, 2147483647), axis=0)  # the first column holding the maximum
    tl.store(p_m + r * S + c, m)
    tl.store(p_s + r * S + c, s)
    tl.store(p_i + r * S + c, idx.to(tl.int64))


# the row count changes from step to step: keep it unspecialised so that a new batch size compiles nothing
@triton.jit(do_not_specialize=["N"])
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
        # a NaN or +inf logit makes the sum NaN, a row of -inf only makes it 0: either leaves conf non-finite
        finite = (conf == conf) & (tl.abs(conf) < float("inf"))
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
        logit_partials_kernel[(N, S)](logits, m, s, i, logits.stride(0), V, S, CHUNK=CHUNK, num_warps=8)
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
