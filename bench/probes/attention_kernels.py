"""Where a decode-attention call's time goes: the split pass and the merge kernel timed apart (torch profiler,
20 eager calls each) at the decode shapes, for the plan ``decode_plan`` picks and with half / a quarter of its
splits; the whole call as a CUDA graph of 20 calls beside them.

    python bench/probes/attention_kernels.py [--prefixes 2048,8192]     # records: bench/probes/results/
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))      # bench/common.py
os.environ.setdefault("FASTDLLM_BENCH_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

from common import ATTENTION_HEADS, decode_attention_inputs, graph_time, kernel_times_us, record  # noqa: E402

from fastdllm_kernels.attention.kernel import decode_attention, decode_plan  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", default="2048,8192")
    args = ap.parse_args()
    command = f"python bench/probes/attention_kernels.py --prefixes {args.prefixes}"
    for model, (hq, hkv) in ATTENTION_HEADS.items():
        for prefix in (int(p) for p in args.prefixes.split(",")):
            for n in (32, 8):
                q, pk, pv, bk, bv, meta = decode_attention_inputs(hq, hkv, prefix, n)
                default = decode_plan(1, hkv, hq // hkv, n, pk.shape[2] + 32)
                for label, div in (("default", 1), ("splits/2", 2), ("splits/4", 4)):
                    plan = dataclasses.replace(default, splits=max(1, default.splits // div))
                    fn = lambda: decode_attention(q, pk, pv, bk, bv, *meta, n_q=n, scale=128 ** -0.5,  # noqa: E731
                                                  plan=plan)
                    graph_us = graph_time(fn)["p50_ms"] * 1e3
                    kernels = kernel_times_us(fn, 20)
                    split = sum(v for k, v in kernels.items() if "fwd" in k)
                    merge = sum(v for k, v in kernels.items() if "combine" in k)
                    record("attention_kernels", model=model, prefix=prefix, queries=n, plan=label,
                           splits=plan.splits, graph_us=graph_us, split_pass_us=split, merge_us=merge,
                           command=command)
                    print(f"{model:4} L={prefix:5d} q{n:2d} {label:8s} s{plan.splits:<3d} graph {graph_us:5.1f} us"
                          f"  split pass {split:5.1f}  merge {merge:4.1f}", flush=True)


if __name__ == "__main__":
    main()
