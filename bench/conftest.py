"""pytest-benchmark suites in bench/ (GPU only; CI runs tests/, not these):

    python -m pytest bench -q --benchmark-columns=median,iqr,rounds --benchmark-json=bench_out.json

Each measurement is also appended to bench/results/<suite>.jsonl with the GPU, versions and commit."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]          # nothing to measure without a GPU


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with the GPU synchronised after every call, so the host clock measures GPU work."""
    def run(fn, rounds=30, warmup=5):
        def call():
            fn()
            torch.cuda.synchronize()
        return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return run
