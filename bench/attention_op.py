"""Attention op at the decode shapes (batch 1): 32 queries of a full block or 8 of a sub-block against the
prefix cache plus the 32-key block cache; GQA 7:1 (7B) and 6:1 (1.5B); head_dim 128; bf16.

Times are GPU time (20 calls captured in one CUDA graph, replayed; the launch overhead of an eager call is
recorded beside it). Providers: ``ours`` (fastdllm_kernels decode_attention), ``sdpa_mask`` (torch SDPA with a boolean mask, the
original's call), ``flex`` (torch flex attention, compiled, same visibility). Roofline: KV bytes read once
over the measured copy bandwidth. Correctness of each provider against the fp32 reference is checked first.

    python bench/attention_op.py [--prefixes 2048,8192]
"""
import argparse

import torch
import torch.nn.functional as F

from common import (ATTENTION_HEADS, DEVICE, copy_bandwidth_gbs, cuda_time, decode_attention_inputs, graph_time,
                    record, with_pdl)

from fastdllm_kernels.attention.kernel import decode_attention
from fastdllm_kernels.attention.reference import decode_attention_ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", default="2048,8192")
    ap.add_argument("--flex", type=int, default=1)
    args = ap.parse_args()
    command = "python bench/attention_op.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    bw = copy_bandwidth_gbs()
    D, dt, dev = 128, torch.bfloat16, DEVICE
    flex = None
    if args.flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention)
        except Exception as e:  # noqa: BLE001
            print(f"flex attention unavailable: {e}")
    table = []
    for model, (hq, hkv) in ATTENTION_HEADS.items():
        for L in [int(x) for x in args.prefixes.split(",")]:
            for n in (32, 8):
                q, pk, pv, bk, bv, meta = decode_attention_inputs(hq, hkv, L, n, D, dt)
                scale = D ** -0.5
                ref = decode_attention_ref(q.float(), pk.float(), pv.float(), bk.float(), bv.float(), *meta, n, scale)
                # the original's layout: [1, H, n, D] queries, keys = prefix ++ block, a boolean mask
                kk = torch.cat([pk[:, :, :L], bk], dim=2)
                vv = torch.cat([pv[:, :, :L], bv], dim=2)
                qq = q.transpose(0, 1)[None]
                mask = torch.ones(1, 1, n, L + 32, dtype=torch.bool, device=dev)
                ours = lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale)  # noqa: E731
                providers = {
                    "ours": ours,
                    "ours_pdl": with_pdl(ours),
                    "sdpa_mask": lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                                        enable_gqa=True),
                }
                if flex is not None:
                    kx, vx = kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)
                    providers["flex"] = lambda: flex(qq, kx, vx, scale=scale)
                kv_bytes = 2 * hkv * (L + 32) * D * 2
                for name, fn in providers.items():
                    out = fn()
                    got = out if name.startswith("ours") else out[0].transpose(0, 1)
                    rel = float((got.float() - ref).norm() / ref.norm())
                    eager = cuda_time(fn, warmup=10, iters=50)["p50_ms"]
                    try:
                        t = graph_time(fn)             # GPU time: the runtime replays these in graphs
                        timing = "cuda graph of 20 calls"
                    except Exception as e:  # noqa: BLE001 - a provider that cannot be captured: eager time
                        print(f"{name}: graph capture failed ({type(e).__name__}); eager time recorded")
                        t, timing = cuda_time(fn, warmup=10, iters=50), "eager (graph capture failed)"
                    gbs = kv_bytes / (t["p50_ms"] / 1e3) / 1e9
                    row = record("attention_op", model=model, provider=name, prefix=L, queries=n, dtype="bf16",
                                 **t, kv_bytes=kv_bytes, kv_GBps=gbs, fraction_of_copy_bw=gbs / bw,
                                 floor_ms=kv_bytes / (bw * 1e9) * 1e3, rel_err_vs_fp32=rel, eager_p50_ms=eager,
                                 timing=timing, command=command)
                    table.append(row)
    print(f"copy bandwidth {bw:.0f} GB/s")
    print(f"{'model':5} {'prefix':>6} {'q':>3} {'provider':10} {'p50 us':>8} {'KV GB/s':>8} {'%bw':>5} {'x sdpa':>7} relerr")
    for r in table:
        base = next(x for x in table if x["model"] == r["model"] and x["prefix"] == r["prefix"]
                    and x["queries"] == r["queries"] and x["provider"] == "sdpa_mask")
        print(f"{r['model']:5} {r['prefix']:6d} {r['queries']:3d} {r['provider']:10} {r['p50_ms'] * 1e3:8.1f} "
              f"{r['kv_GBps']:8.0f} {100 * r['fraction_of_copy_bw']:5.1f} {base['p50_ms'] / r['p50_ms']:7.2f} "
              f"{r['rel_err_vs_fp32']:.1e}")


if __name__ == "__main__":
    main()
