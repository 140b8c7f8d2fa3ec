"""How fast can any kernel on this GPU read a decode projection's weight bytes? (the read-only ceiling)

The steps' floor counts a step's bytes at the copy bandwidth (bytes read + written by ``dst.copy_(src)``,
``common.copy_bandwidth_gbs``). A matmul only reads its weight, and a read-only stream may go faster or slower
than a copy. This script times the plainest read there is - a grid of programs summing the bytes in pipelined
chunks (no MMA, no epilogue) - at each projection's weight size, every grid / chunk / pipeline depth, as a CUDA
graph over rotating copies (together > 3 x the L2, so nothing is warm), and reports the best rate. A linear
that reaches that time cannot stream its weight faster in any tiling; the gap between the two is what a better
weight stream could still buy. The same for one layer's KV cache at a few prefixes: the most of the copy
bandwidth that decode attention could reach on those bytes.

    python bench/read_ceiling.py [--shapes 7B,1.5B]
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms


@triton.jit
def read_sum_kernel(p, n, p_sink, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Read ``n`` elements; the sum is stored only if it equals an impossible value, so the loads stay live."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.range(pid * BLOCK, n, G * BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


def stream_bytes(fields: dict, kv_prefixes=()) -> dict:
    """Bytes each decode kernel streams at batch 1: the four projections' weights, and one layer's K and V
    cache at each prefix length in ``kv_prefixes`` (what decode attention must read, bf16)."""
    d, f = fields["hidden_size"], fields["intermediate_size"]
    hd = d // fields["num_attention_heads"]
    q, kv = fields["num_attention_heads"] * hd, fields["num_key_value_heads"] * hd
    sizes = {"qkv": (q + 2 * kv) * d * 2, "o": d * q * 2, "gate_up": 2 * f * d * 2, "down": d * f * 2}
    sizes.update({f"kv@{n}": 2 * kv * n * 2 for n in kv_prefixes})
    return sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--per-sm", default="1,2,4,8")
    ap.add_argument("--blocks", default="4096,16384")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--kv-prefixes", default="2048,8192", help="also one layer's KV cache at these prefixes")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbs = copy_bandwidth_gbs()
    sink = torch.zeros(1, device=DEVICE)
    command = "python bench/read_ceiling.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    print(f"copy bandwidth {copy_gbs / 1e3:.2f} TB/s (read + written)")
    print(f"{'shape':5} {'weight':8} {'MB':>7} {'copy-floor us':>13} {'read us':>8} {'TB/s':>5}  best (per SM, block, stages, warps)")
    for shape in args.shapes.split(","):
        kv_prefixes = [int(n) for n in args.kv_prefixes.split(",") if n]
        for name, nbytes in stream_bytes(SHAPES[shape], kv_prefixes).items():
            copies = copies_beyond_l2(nbytes)
            bufs = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_() for _ in range(copies)]
            best, by_per_sm = None, {}
            for per_sm, block, stages, warps in itertools.product(
                    *(map(int, getattr(args, a).split(",")) for a in ("per_sm", "blocks", "stages", "warps"))):
                def fn(i, grid=per_sm * sms, block=block, stages=stages, warps=warps):
                    read_sum_kernel[(grid,)](bufs[i], bufs[i].numel(), sink, BLOCK=block, STAGES=stages,
                                             num_warps=warps)
                t = rotating_graph_ms(fn, copies, reps=4, iters=15) * 1e3
                by_per_sm[per_sm] = min(t, by_per_sm.get(per_sm, t))
                if best is None or t < best[0]:
                    best = (t, per_sm, block, stages, warps)
            t, per_sm, block, stages, warps = best
            floor_us = nbytes / copy_gbs / 1e3
            record("read_ceiling", shape=shape, weight=name, bytes=nbytes, read_us=t, read_tbs=nbytes / t / 1e6,
                   copy_floor_us=floor_us, copy_tbs=copy_gbs / 1e3, per_sm=per_sm, block=block, stages=stages,
                   warps=warps, best_us_by_programs_per_sm=by_per_sm, command=command)
            print(f"{shape:5} {name:8} {nbytes / 1e6:7.1f} {floor_us:13.1f} {t:8.1f} {nbytes / t / 1e6:5.2f}  "
                  f"{per_sm}, {block}, {stages}, {warps}   by programs per SM: "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in by_per_sm.items()))


if __name__ == "__main__":
    main()
