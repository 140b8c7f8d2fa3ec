"""Where the sampler's time outside forwards goes (the share ``bench/e2e.py`` reports), at batch 1, threshold 1.

The GPU idles from the end of one forward until the next forward's start: the logits' confidence and argmax
(``_greedy_choice``: GPU kernels, then a copy to the host that waits for the forward), the sampler's Python
for the row, and the next request. This script times that gap on the host clock for every step of a
``generate`` call (from ``_greedy_choice``'s return to the next forward's start, and ``_greedy_choice``
itself from the forward's return), the same two spans on the GPU clock (CUDA events: forward end -> choice on
the host -> next forward start), beside the forward share the engine measures, then profiles one more call
with cProfile (host functions by own time).

    python bench/sampler_host.py --shape 1.5B
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from common import SHAPES, random_state_dict, record, sync
from e2e import IDS

import fastdllm_rt
from fastdllm_rt import engine as engine_mod, sampler as sampler_mod, stats as stats_mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--backend", default="triton")
    args = ap.parse_args()
    command = "python bench/sampler_host.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    rt = fastdllm_rt.from_state_dict(SHAPES[args.shape], random_state_dict(SHAPES[args.shape]), dtype="bf16",
                                     backend=args.backend, **IDS)
    prompt = torch.randint(0, 150000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_new_tokens=args.new, threshold=1.0, use_block_cache=True, batch_size=1)
    rt.generate([prompt], **kw)                      # warm: kernels, graphs
    marks = {"run_enter": [], "choice_enter": [], "choice_exit": []}
    events = {"start": [], "stop": [], "choice_exit": []}        # GPU clock: forward start / end, choice done
    real_run, real_choice = engine_mod.Engine._run, sampler_mod._greedy_choice
    Timer = stats_mod.ForwardTimer
    real_start, real_stop = Timer.start, Timer.stop

    def run(self, requests):
        marks["run_enter"].append(time.perf_counter())
        return real_run(self, requests)

    def choice(*args):
        marks["choice_enter"].append(time.perf_counter())
        out = real_choice(*args)
        marks["choice_exit"].append(time.perf_counter())
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events["choice_exit"].append(ev)
        return out

    def start(self):
        real_start(self)
        events["start"].append(self._t0)

    def stop(self):
        real_stop(self)
        events["stop"].append(self._pairs[-1][1])

    engine_mod.Engine._run, sampler_mod._greedy_choice = run, choice
    Timer.start, Timer.stop = start, stop
    try:
        sync()
        t0 = time.perf_counter()
        out = rt.generate([prompt], **kw)
        sync()
        wall = time.perf_counter() - t0
    finally:
        engine_mod.Engine._run, sampler_mod._greedy_choice = real_run, real_choice
        Timer.start, Timer.stop = real_start, real_stop
    st = out.stats
    gaps = [(b - a) * 1e6 for a, b in zip(marks["choice_exit"], marks["run_enter"][1:])]
    choice = [(b - a) * 1e6 for a, b in zip(marks["choice_enter"], marks["choice_exit"])]
    # GPU clock: from a forward's end until the sampler has its choice on the host, and from then until the
    # next forward's start (the two parts of the GPU's idle time between forwards)
    after_fwd = [a.elapsed_time(b) * 1e3 for a, b in zip(events["stop"], events["choice_exit"])]
    to_next = [a.elapsed_time(b) * 1e3 for a, b in zip(events["choice_exit"], events["start"][1:])]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    outside_ms = (wall - st.forward_time_s) * 1e3
    prof = cProfile.Profile()
    prof.enable()
    rt.generate([prompt], **kw)
    sync()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    row = record("sampler_host", shape=args.shape, batch=1, prompt=args.prompt, new_tokens=args.new,
                 wall_s=wall, forward_time_s=st.forward_time_s, outside_forwards=1 - st.forward_time_s / wall,
                 model_calls=st.model_calls, outside_ms_per_call=outside_ms / st.model_calls,
                 gap_after_choice_us_median=med(gaps), gap_after_choice_us_sum_ms=sum(gaps) / 1e3,
                 greedy_choice_us_median=med(choice), gpu_forward_end_to_choice_us_median=med(after_fwd),
                 gpu_forward_end_to_choice_ms_sum=sum(after_fwd) / 1e3,
                 gpu_choice_to_next_forward_us_median=med(to_next),
                 gpu_choice_to_next_forward_ms_sum=sum(to_next) / 1e3, command=command)
    print(f"forwards {row['model_calls']}, wall {wall * 1e3:.1f} ms, outside forwards {outside_ms:.1f} ms "
          f"({row['outside_forwards']:.3f}; {row['outside_ms_per_call'] * 1e3:.0f} us a forward); host gap after "
          f"the choice: median {row['gap_after_choice_us_median']:.0f} us, "
          f"sum {row['gap_after_choice_us_sum_ms']:.1f} ms; "
          f"_greedy_choice (waits for the forward): median {row['greedy_choice_us_median']:.0f} us")
    print(f"GPU clock: forward end -> choice on the host: median {row['gpu_forward_end_to_choice_us_median']:.0f} "
          f"us, sum {row['gpu_forward_end_to_choice_ms_sum']:.1f} ms; choice -> next forward: median "
          f"{row['gpu_choice_to_next_forward_us_median']:.0f} us, "
          f"sum {row['gpu_choice_to_next_forward_ms_sum']:.1f} ms")


if __name__ == "__main__":
    main()
