"""Count the runtime's named ranges (fastdllm:<kinds>) in a torch-profiler trace and record them (issue 6:
the torch-profiler fallback's trace must name the forward kinds on a GPU).

    FASTDLLM_TORCH_PROFILE=trace.json python -m evalbridge --model_args model=fastdllm_rt/small_model,... \\
        --tasks synth_arith --limit 4 --output_dir out
    python bench/trace_ranges.py trace.json --command "<the command above>"
"""
import argparse
import collections
import json

import torch

from common import record


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    events = json.load(open(args.trace))["traceEvents"]
    names = collections.Counter(e["name"] for e in events if str(e.get("name", "")).startswith("fastdllm:"))
    gpu_kernels = sum(1 for e in events if e.get("cat") == "kernel")
    row = record("profile_trace", ranges=dict(names), gpu_kernel_events=gpu_kernels,
                 names_forward_kinds=all(any(k in n for n in names) for k in ("full_block", "sub_block", "commit")),
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", command=args.command)
    print("trace ranges:", row["ranges"], "| GPU kernel events:", gpu_kernels)


if __name__ == "__main__":
    main()
