"""Where a decode step's GPU time goes: one full-block step (prefix 2048, batch 1, triton backend, eager so that
every kernel shows up by name) under the torch profiler, kernel times summed by category (matmul, attention,
RoPE + KV write, norms, SwiGLU, other) against the weight-read floor.

    python bench/probes/step_profile.py [--shape 7B]     # records: bench/probes/results/step_profile.jsonl
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))      # bench/common.py
os.environ.setdefault("FASTDLLM_BENCH_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

import torch  # noqa: E402

import fastdllm_rt  # noqa: E402
from common import (SHAPES, copy_bandwidth_gbs, kernel_times_us, random_ids, random_state_dict,  # noqa: E402
                    record, step_weight_bytes, token_ids)
from fastdllm_rt.batch import Kind, RowRequest, build_batch  # noqa: E402

CATS = [("attention", ("decode_attention", "prefill_attention")), ("fused_linear", ("fused_linear", "qkv_rope")),
        ("rope_kv_write", ("rope_write",)), ("norms", ("rms_norm",)), ("swiglu", ("swiglu",)),
        ("logit_stats", ("logit_stats",)),
        ("matmul", ("gemm", "nvjet", "cutlass", "sm90", "xmma", "splitk", "gemv", "Kernel2"))]


def category(name):
    for cat, keys in CATS:
        if any(k in name for k in keys):
            return cat
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    fields = SHAPES[args.shape]
    sd = random_state_dict(fields)
    step_bytes = step_weight_bytes(sd)
    bw = copy_bandwidth_gbs()
    rt = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend="triton",
                                     **token_ids(fields["vocab_size"]))
    del sd
    caches = rt.pool.acquire(1, args.prefix + 64, None)
    slot = caches.alloc()
    ids = random_ids(fields["vocab_size"], args.prefix + 32)
    bs = fields["bd_size"]
    with torch.inference_mode():
        rt.model(build_batch([RowRequest(Kind.PREFILL, slot, 0, ids[:args.prefix])], rt.device, bs), caches)
        full = RowRequest(Kind.FULL, slot, args.prefix, ids[args.prefix:], logits_at=list(range(8)))
        step = lambda: rt.model(build_batch([full], rt.device, bs), caches)  # noqa: E731
        for _ in range(3):
            step()
        totals = collections.Counter()
        for name, us in kernel_times_us(step, args.steps).items():
            totals[category(name)] += us
    per_step = {k: v / 1e3 for k, v in totals.items()}                  # us -> ms
    floor = step_bytes / (bw * 1e9) * 1e3
    gpu = sum(per_step.values())
    mm = per_step.get("matmul", 0) + per_step.get("fused_linear", 0) or 1e-9   # fused linears read the weights
    record("step_profile", shape=args.shape, step="full", prefix=args.prefix, kernel_ms=per_step,
           kernel_total_ms=gpu, floor_ms=floor, matmul_GBps=step_bytes / (mm / 1e3) / 1e9,
           command="python bench/probes/step_profile.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))
    print(f"{args.shape} full-block step, kernel time per step (ms), floor {floor:.3f} ms")
    for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12} {v:7.3f}")
    print(f"  {'total':12} {gpu:7.3f}   matmuls read the weights at {step_bytes / (mm / 1e3) / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
