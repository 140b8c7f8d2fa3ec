"""One pass over each row of logits: (max, argmax, logsumexp) with an online softmax denominator."""
import torch
import triton
import triton.language as tl


@triton.jit
def logit_stats_fwd_kernel(p_x, p_max, p_idx, p_lse, stride_x, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    b_m = tl.full([BLOCK], float("-inf"), tl.float32)        # running max per lane
    b_s = tl.zeros([BLOCK], tl.float32)                      # running sum of exp(x - m) per lane
    b_i = tl.zeros([BLOCK], tl.int64)                        # first index of the lane max
    for start in range(0, V, BLOCK):
        col = start + offs
        b_x = tl.load(p_x + row * stride_x + col, mask=col < V, other=float("-inf")).to(tl.float32)
        better = b_x > b_m
        new_m = tl.maximum(b_m, b_x)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)   # lanes that saw only -inf so far
        b_s = b_s * tl.exp(b_m - safe_m) + tl.exp(b_x - safe_m)
        b_i = tl.where(better, col.to(tl.int64), b_i)
        b_m = new_m
    m = tl.max(b_m, axis=0)
    s = tl.sum(b_s * tl.exp(b_m - m), axis=0)
    # the first column holding the maximum: smallest index among lanes whose max equals m
    big = tl.full([BLOCK], 9223372036854775807, tl.int64)
    idx = tl.min(tl.where(b_m == m, b_i, big), axis=0)
    tl.store(p_max + row, m)
    tl.store(p_idx + row, idx)
    tl.store(p_lse + row, m + tl.log(s))


def logit_stats(logits: torch.Tensor):
    assert logits.dim() == 2 and logits.stride(-1) == 1, tuple(logits.shape)
    N, V = logits.shape
    mx = torch.empty(N, dtype=torch.float32, device=logits.device)
    idx = torch.empty(N, dtype=torch.int64, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        logit_stats_fwd_kernel[(N,)](logits, mx, idx, lse, logits.stride(0), V, BLOCK=2048, num_warps=8)
    return mx, idx, lse
