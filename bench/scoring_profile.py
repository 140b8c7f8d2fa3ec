"""Where trajectory scoring's time goes (issue 8 diagnosis): the MMLU-like workload of bench/scoring.py,
scored three times in one process; every engine forward is timed (synchronised) and grouped by kind and
batch shape, so one-off costs (kernel compiles, graph captures) separate from steady-state work.

    python bench/scoring_profile.py --shape 1.5B --questions 512
"""
import argparse
import collections
import time

import fastdllm_rt
from fastdllm_rt import engine as engine_mod
from common import RELEASED_IDS, SHAPES, random_state_dict, record, sync
from scoring import requests_of, workload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--questions", type=int, default=512)
    ap.add_argument("--scoring", default="trajectory")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rt = fastdllm_rt.from_state_dict(SHAPES[args.shape], random_state_dict(SHAPES[args.shape]), dtype="bf16",
                                     backend="triton", **RELEASED_IDS)
    log = []
    original = engine_mod.Engine._run

    def timed(self, requests):
        sync()
        t0 = time.perf_counter()
        out = original(self, requests)
        sync()
        kinds = collections.Counter(r.kind.name for r in requests)
        log.append((dict(kinds), sum(r.tokens.numel() for r in requests), time.perf_counter() - t0))
        return out

    engine_mod.Engine._run = timed
    reqs = requests_of(workload(args.questions))
    for rep in range(args.repeats):
        log.clear()
        sync()
        t0 = time.perf_counter()
        rt.score(reqs, scoring=args.scoring, use_block_cache=False)
        sync()
        total = time.perf_counter() - t0
        by = collections.defaultdict(lambda: [0, 0, 0.0])
        for kinds, tokens, dt in log:
            key = "+".join(sorted(kinds))
            by[key][0] += 1
            by[key][1] += tokens
            by[key][2] += dt
        fwd = sum(dt for *_, dt in log)
        print(f"repeat {rep}: {total:.3f} s total, {fwd:.3f} s in {len(log)} forwards, "
              f"{total - fwd:.3f} s outside")
        for key, (n, tokens, dt) in sorted(by.items()):
            print(f"   {key:20} {n:4d} calls {tokens:8d} tokens {dt:7.3f} s  {tokens / dt / 1e3:8.1f} ktok/s")
        slow = sorted(log, key=lambda e: -e[2])[:5]
        print("   slowest:", [(k, t, round(d, 3)) for k, t, d in slow])
        record("scoring_profile", shape=args.shape, scoring=args.scoring, repeat=rep, seconds=total,
               forward_seconds=fwd, forwards=len(log),
               by_kind={k: {"calls": v[0], "tokens": v[1], "seconds": v[2]} for k, v in by.items()},
               command="python bench/scoring_profile.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
