"""Probe: can the O projection's weight be read into L2 while the layer's attention runs?

At batch 1 a decode layer's attention is latency-bound: 10-16 us in which the HBM is mostly idle, followed by
the O projection (7B: 25.7 MB of weight, 12.5 us against an 8.6 us floor). If a kernel on a second stream of
the CUDA graph reads the O weight into L2 (loads marked evict_last) while attention runs, the O projection
reads it from L2. This script measures, per model and window (32 / 8 queries, prefix 2048), each as a CUDA
graph over rotating copies of the weights and KV caches (together > 3x the L2, so nothing is warm by accident):

* ``attn``: attention alone; ``o_cold``: the O projection alone; ``serial``: attention then O (today's step);
* ``o_after_warm``: warm(W) then O(W), minus warm(W) alone: O on an L2-warm weight (the best case);
* ``overlap_g<G>``: warm(W) with G programs on a side stream beside attention, joined before O - the candidate.

    python bench/l2_warm.py [--grids 16,32,66,132]
"""
import argparse

import torch
import triton
import triton.language as tl

from common import (ATTENTION_HEADS, DEVICE, SHAPES, copies_beyond_l2, decode_attention_inputs, record,
                    rotating_graph_ms)

from fastdllm_kernels.attention.kernel import decode_attention
from fastdllm_kernels.linear.dispatch import linear


@triton.jit
def l2_warm_kernel(p, n, p_sink, BLOCK: tl.constexpr):
    """Read ``n`` elements into L2 (evict_last); the sum is stored only if it equals an impossible value, so the
    loads are not dead code."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(pid * BLOCK, n, G * BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0.0, eviction_policy="evict_last").to(tl.float32)
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


def l2_warm(w, sink, grid):
    l2_warm_kernel[(grid,)](w, w.numel(), sink, BLOCK=4096, num_warps=4, num_stages=4)


def graph_ms(body, copies: int, reps: int = 3, iters: int = 20) -> float:
    """Median GPU time of one ``body(i)`` call over the ``copies`` rotating inputs; the graph records
    ``body(i, side)`` with a side stream for the overlap case."""
    side = torch.cuda.Stream()
    return rotating_graph_ms(body, copies, reps, iters, capture_body=lambda i: body(i, side))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", default="16,32,66,132")
    ap.add_argument("--models", default="7B,1.5B")
    ap.add_argument("--prefix", type=int, default=2048)
    args = ap.parse_args()
    command = "python bench/l2_warm.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    dt, D = torch.bfloat16, 128
    sink = torch.zeros(1, device=DEVICE)
    table = []
    for model in args.models.split(","):
        hq, hkv = ATTENTION_HEADS[model]
        hidden = SHAPES[model]["hidden_size"]
        w_bytes = hidden * hq * D * 2
        kv_bytes = 2 * hkv * (args.prefix + 64) * D * 2
        copies = copies_beyond_l2(w_bytes + kv_bytes, at_least=2, at_most=20)
        ws = [torch.randn(hidden, hq * D, device=DEVICE, dtype=dt) * 0.02 for _ in range(copies)]
        for n in (32, 8):
            inputs = [decode_attention_inputs(hq, hkv, args.prefix, n, D, dt) for _ in range(copies)]
            res = torch.randn(n, hidden, device=DEVICE, dtype=dt)
            outs = [torch.empty(n, hq, D, device=DEVICE, dtype=dt) for _ in range(copies)]
            scale = D ** -0.5

            def attn(i):
                q, pk, pv, bk, bv, meta = inputs[i]
                decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale, out=outs[i])

            def o_proj(i):
                return linear(outs[i].view(n, hq * D), ws[i], residual=res)

            times = {
                "attn": graph_ms(lambda i, s=None: attn(i), copies),
                "o_cold": graph_ms(lambda i, s=None: o_proj(i), copies),
                "serial": graph_ms(lambda i, s=None: (attn(i), o_proj(i)), copies),
            }
            for grid in [int(x) for x in args.grids.split(",")]:
                warm_alone = graph_ms(lambda i, s=None: l2_warm(ws[i], sink, grid), copies)
                warm_then_o = graph_ms(lambda i, s=None: (l2_warm(ws[i], sink, grid), o_proj(i)), copies)
                times[f"warm_g{grid}"] = warm_alone
                times[f"o_after_warm_g{grid}"] = warm_then_o - warm_alone

                def overlap(i, side=None):
                    if side is None:
                        attn(i)
                        l2_warm(ws[i], sink, grid)
                        return o_proj(i)
                    main = torch.cuda.current_stream()
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        l2_warm(ws[i], sink, grid)
                    attn(i)
                    main.wait_stream(side)
                    return o_proj(i)
                times[f"overlap_g{grid}"] = graph_ms(overlap, copies)
            us = {k: round(v * 1e3, 2) for k, v in times.items()}
            row = record("l2_warm", model=model, queries=n, prefix=args.prefix, o_weight_bytes=w_bytes,
                         copies=copies, times_us=us, command=command)
            table.append(row)
            print(model, n, us, flush=True)
    print(f"\n{'model':5} {'q':>3} {'attn':>6} {'O cold':>7} {'serial':>7} | best overlap (grid) | O warm")
    for r in table:
        t = r["times_us"]
        ov = min((v, k) for k, v in t.items() if k.startswith("overlap"))
        ow = min(v for k, v in t.items() if k.startswith("o_after_warm"))
        print(f"{r['model']:5} {r['queries']:3} {t['attn']:6.1f} {t['o_cold']:7.1f} {t['serial']:7.1f} | "
              f"{ov[0]:6.1f} ({ov[1]}) | {ow:6.1f}")


if __name__ == "__main__":
    main()
