"""GPU timing and measurement records, shared by the tiling sweep (``fastdllm_kernels.linear.sweep``) and the
benchmark suites in ``bench/``.

Times are GPU times from CUDA events (median, 20th and 80th percentile over the timed calls, after warm-up);
off the GPU the host clock stands in, so the scripts can be smoke-tested on a CPU. A record is one JSON line
naming what was measured and how: card, torch and triton versions, commit, date and the command."""
from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, warmup: int = 5, iters: int = 30) -> dict:
    """Median / p20 / p80 of ``fn`` in milliseconds, CUDA events around each call (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"p50_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def graph_time(fn, reps: int = 20, iters: int = 20) -> dict:
    """GPU time of one ``fn`` call without host launch overhead: ``reps`` calls captured in one CUDA graph,
    the replay timed and divided by ``reps`` (``cuda_time`` off the GPU)."""
    if DEVICE != "cuda":
        return cuda_time(fn)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    t = cuda_time(g.replay, warmup=3, iters=iters)
    return {k: v / reps for k, v in t.items()}


def copies_beyond_l2(nbytes: int, at_least: int = 1, at_most: int | None = None) -> int:
    """How many copies of an input of ``nbytes`` together exceed the GPU's L2 three times over: calls that
    rotate through them read every input from HBM, as in a model step (``at_least`` off the GPU)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if DEVICE == "cuda" else 0
    n = max(at_least, -(-3 * l2 // nbytes))
    return n if at_most is None else min(at_most, n)


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate, bytes read + written: the bandwidth a weight-streaming kernel's floor uses."""
    if DEVICE != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), warmup=3, iters=10)["p50_ms"]
    return 2 * nbytes / (t / 1e3) / 1e9


@functools.lru_cache(maxsize=1)
def env_info() -> dict:
    """The card, versions and commit a measurement ran on."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit}


def append_record(path: str, row: dict) -> dict:
    """Append ``row`` with the card, versions, commit and UTC date to the JSON-lines file ``path``."""
    row = {**row, **env_info(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
