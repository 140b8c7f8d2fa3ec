"""Where the host time of a graph-replayed decode step goes (batch 1, prefix 2048): the step as the sampler runs
it (``Engine.run``) split into request building, batch packing, the metadata copy, the graph launch, the
rebind and the logits copy, timed on the host clock; beside it, GPU time from the step's start to its end and
the graph replay alone (CUDA events). The GPU idles while the host packs and copies, so those count in a step.

    python bench/step_host.py --shape 1.5B
"""
import argparse
import time

import torch

from common import RELEASED_IDS, SHAPES, cuda_time, random_state_dict, record
from steps import ours_steps

import fastdllm_rt
from fastdllm_rt import batch as batch_mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    rt = fastdllm_rt.from_state_dict(SHAPES[args.shape], random_state_dict(SHAPES[args.shape]), dtype="bf16",
                                     backend="triton", **RELEASED_IDS)
    steps, engine = ours_steps(rt, args.prefix)
    runner = engine.graphs
    spans: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spans.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)
            return out
        return wrapper

    import fastdllm_rt.graphs as graphs_mod
    graphs_mod.pack_batch = timed("pack_batch", batch_mod.pack_batch)
    graphs_mod.rebind = timed("rebind", batch_mod.rebind)
    rows = []
    for name in ("sub", "sub_skip12", "full"):
        fn = steps[name]
        with torch.inference_mode():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            spans.clear()
            cap = runner.last
            cap.graph.replay = timed("graph_launch", cap.graph.replay)
            cap.buffer.copy_ = timed("metadata_copy", cap.buffer.copy_)
            total = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                fn()
                total.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
            step = cuda_time(fn, warmup=3, iters=args.iters)["p50_ms"]
            del cap.graph.replay, cap.buffer.copy_
            replay = cuda_time(runner.last.graph.replay, warmup=3, iters=args.iters)["p50_ms"]
        med = {k: sorted(v)[len(v) // 2] for k, v in spans.items()}
        med["host_total"] = sorted(total)[len(total) // 2]
        rows.append(record("step_host", shape=args.shape, step=name, prefix=args.prefix, host_us=med,
                           step_ms=step, replay_ms=replay, command=f"python bench/step_host.py --shape {args.shape}"))
        print(f"{args.shape} {name:10} step {step:.3f} ms  replay {replay:.3f} ms  gap {1e3 * (step - replay):.0f} us  "
              + "  ".join(f"{k} {v:.0f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
