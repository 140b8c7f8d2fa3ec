"""Issue 8 acceptance 4 on a real GPU: a scoring workload that does not fit at the requested batch size
completes with smaller chunks, says so once in the log, and loses nothing. GPU memory is capped with
``torch.cuda.set_per_process_memory_fraction`` so that the requested chunk's prefix caches cannot fit.

    python bench/scoring_oom.py [--shape 1.5B] [--questions 128] [--headroom-gb 1.5]
"""
import argparse
import logging

import torch

import fastdllm_rt
from common import RELEASED_IDS, SHAPES, random_state_dict, record
from scoring import requests_of, workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--headroom-gb", type=float, default=1.5)
    args = ap.parse_args()
    rt = fastdllm_rt.from_state_dict(SHAPES[args.shape], random_state_dict(SHAPES[args.shape]), dtype="bf16",
                                     backend="triton", **RELEASED_IDS)
    reqs = requests_of(workload(args.questions))
    want = rt.score(reqs, batch_size=len(reqs))                 # fits without a cap
    rt.release_caches()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (torch.cuda.memory_allocated() + args.headroom_gb * 2**30) / total
    torch.cuda.set_per_process_memory_fraction(cap)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    logging.getLogger("fastdllm_rt").addHandler(handler)
    got = rt.score(reqs, batch_size=len(reqs))
    a, b = torch.tensor(got.loglikelihoods), torch.tensor(want.loglikelihoods)
    backoff_lines = [m for m in lines if "did not fit in GPU memory" in m]
    row = record("scoring_oom", shape=args.shape, requests=len(reqs), requested_batch=len(reqs),
                 memory_cap_fraction=cap, completed=len(got.loglikelihoods) == len(reqs),
                 backoff_log_lines=len(backoff_lines), log=backoff_lines, notes=got.stats.notes,
                 max_abs_diff_vs_uncapped=float((a - b).abs().max()),
                 command="python bench/scoring_oom.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                  for k, v in vars(args).items()))
    print(f"completed {row['completed']}, backoff log lines {row['backoff_log_lines']}, notes {got.stats.notes}, "
          f"max |capped - uncapped| {row['max_abs_diff_vs_uncapped']:.2e}")


if __name__ == "__main__":
    main()
