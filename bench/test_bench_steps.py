"""Step-level pytest-benchmark suite: each decode step kind at batch 1, prefix 2048, through the
runtime's ForwardRunner (triton backend: CUDA-graph replays) and through the original's Hugging Face path, with the
weight-read floor recorded beside them. bench/steps.py is the same measurement with CUDA-event timing."""
import gc

import pytest
import torch

import fastdllm_rt
from common import RELEASED_IDS, SHAPES, copy_bandwidth_gbs, random_state_dict, record, step_weight_bytes
from steps import hf_steps, ours_steps

PREFIX = 2048
_cache: dict = {}


def _steps(shape, provider):
    key = (shape, provider)
    if key not in _cache:
        _cache.clear()
        gc.collect()
        torch.cuda.empty_cache()
        sd = random_state_dict(SHAPES[shape])
        floor = step_weight_bytes(sd) / (copy_bandwidth_gbs() * 1e9) * 1e3
        if provider == "hf":
            steps, keep = hf_steps(SHAPES[shape], sd, PREFIX)
        else:
            keep = fastdllm_rt.from_state_dict(SHAPES[shape], sd, dtype="bf16", backend="triton", **RELEASED_IDS)
            steps, _ = ours_steps(keep, PREFIX)
        _cache[key] = (steps, keep, floor)
    return _cache[key]


CASES = [(shape, provider, step) for shape in ("7B", "1.5B") for provider in ("triton", "hf")
         for step in ("full", "sub", "sub_skip12", "commit") if not (provider == "hf" and step == "sub_skip12")]


@pytest.mark.parametrize("shape,provider,step", CASES)
def test_step(timed, benchmark, shape, provider, step):
    steps, _, floor = _steps(shape, provider)
    with torch.inference_mode():
        timed(steps[step], rounds=30)
    med = benchmark.stats.stats.median * 1e3
    record("bench_steps", shape=shape, provider=provider, step=step, prefix=PREFIX, batch=1, median_ms=med,
           floor_ms=floor, ratio_to_floor=med / floor, timing="host clock, synchronised per call",
           command="python -m pytest bench/test_bench_steps.py")
