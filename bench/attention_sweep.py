"""Sweep the decode-attention launch plan (key tile, K/V splits, pipeline depth, query tile, then the merge
kernel's rows per program and warps) at the decode shapes, next to the plan ``decode_plan`` picks. One JSON line per shape in
``bench/results/attention_sweep.jsonl`` with the best plan, the default plan's time and SDPA-with-mask's.

    python bench/attention_sweep.py [--prefixes 2048,8192]
"""
import argparse
import dataclasses
import itertools

import torch
import torch.nn.functional as F

from common import ATTENTION_HEADS, DEVICE, copy_bandwidth_gbs, decode_attention_inputs, graph_time, record

from fastdllm_kernels.attention.kernel import DecodePlan, decode_attention, decode_plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", default="2048,8192")
    args = ap.parse_args()
    command = f"python bench/attention_sweep.py --prefixes {args.prefixes}"
    bw = copy_bandwidth_gbs()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    D, dt = 128, torch.bfloat16
    rows = []
    for model, (hq, hkv) in ATTENTION_HEADS.items():
        G = hq // hkv
        for L, n in itertools.product((int(x) for x in args.prefixes.split(",")), (32, 8)):
            q, pk, pv, bk, bv, meta = decode_attention_inputs(hq, hkv, L, n, D, dt)
            scale = D ** -0.5
            ref = decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale,
                                   plan=DecodePlan(block_m=64, m_tiles=-(-G * n // 64), splits=1)).float()
            kk, vv = torch.cat([pk[:, :, :L], bk], 2), torch.cat([pv[:, :, :L], bv], 2)
            qq, mask = q.transpose(0, 1)[None], torch.ones(1, 1, n, L + 32, dtype=torch.bool, device=DEVICE)
            sdpa = graph_time(lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                                     enable_gqa=True))["p50_ms"]
            default = decode_plan(1, hkv, G, n, L + 64 + 32, num_sms)
            default_ms = graph_time(lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale,
                                                             plan=default))["p50_ms"]
            best, best_ms = default, default_ms
            for bm in {64, 128} if G * n > 64 else {64}:
                m_tiles = -(-G * n // bm)
                for bn, stages, splits in itertools.product((32, 64, 128), (2, 3, 4), (4, 8, 16, 32, 64)):
                    plan = DecodePlan(bm, m_tiles, splits, bn, 8 if bm * bn >= 128 * 64 else 4, stages)
                    try:
                        fn = lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale, plan=plan)  # noqa: E731
                        err = float((fn().float() - ref).abs().max())
                        ms = graph_time(fn, reps=20, iters=10)["p50_ms"]
                    except Exception as e:  # noqa: BLE001 - shared memory exceeded
                        print(f"  skip {plan}: {type(e).__name__}")
                        continue
                    assert err < 2e-2, f"{plan}: max err {err} against the one-split result"
                    if ms < best_ms:
                        best, best_ms = plan, ms
            splits_p2 = 1 << (best.splits - 1).bit_length()
            for merge_rows, warps in itertools.product((1, 2, 4, 8, 16, 32), (4, 8)):
                if best.splits == 1 or best.block_m % merge_rows or splits_p2 * merge_rows * D > 32768:
                    continue
                plan = dataclasses.replace(best, merge_rows=merge_rows, merge_warps=warps)
                fn = lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=scale, plan=plan)  # noqa: E731
                err = float((fn().float() - ref).abs().max())
                assert err < 2e-2, f"{plan}: max err {err} against the one-split result"
                ms = graph_time(fn, reps=20, iters=10)["p50_ms"]
                if ms < best_ms:
                    best, best_ms = plan, ms
            kv_bytes = 2 * hkv * (L + 32) * D * 2
            rows.append(record("attention_sweep", model=model, prefix=L, queries=n, best_plan=vars(best),
                               best_ms=best_ms, default_plan=vars(default), default_ms=default_ms, sdpa_ms=sdpa,
                               kv_bytes=kv_bytes, best_fraction_of_copy_bw=kv_bytes / (best_ms / 1e3) / 1e9 / bw,
                               command=command))
            print(f"{model:4} L={L:5d} q={n:2d} default {default_ms * 1e3:6.1f} us  best {best_ms * 1e3:6.1f} us  "
                  f"sdpa {sdpa * 1e3:6.1f} us  {best}", flush=True)
    print(f"{'model':5} {'prefix':>6} {'q':>3} {'default':>8} {'best':>6} {'sdpa':>6} {'%bw':>5}  plan")
    for r in rows:
        b = r["best_plan"]
        print(f"{r['model']:5} {r['prefix']:6d} {r['queries']:3d} {r['default_ms'] * 1e3:8.1f} {r['best_ms'] * 1e3:6.1f} "
              f"{r['sdpa_ms'] * 1e3:6.1f} {100 * r['best_fraction_of_copy_bw']:5.1f}  bm{b['block_m']} bn{b['block_n']} "
              f"s{b['splits']} st{b['num_stages']} w{b['num_warps']} merge r{b['merge_rows']} w{b['merge_warps']}")


if __name__ == "__main__":
    main()
