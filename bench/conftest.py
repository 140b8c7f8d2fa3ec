"""pytest-benchmark suites in bench/ (they time GPU work: on a machine without a CUDA GPU they are collected and
skipped, saying why; the CPU test suite is tests/):

    python -m pytest bench -q --benchmark-columns=median,iqr,rounds --benchmark-json=bench_out.json

Each measurement is also appended to bench/results/<suite>.jsonl with card, versions, commit, date and command."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # the suites import bench/common.py as common


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="times GPU work: needs a CUDA GPU")
    for item in items:
        if str(item.fspath).startswith(os.path.dirname(os.path.abspath(__file__))):
            item.add_marker(skip)


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) with the GPU synchronised after every call, so the host clock measures GPU work."""
    def run(fn, rounds=30, warmup=5):
        def call():
            fn()
            torch.cuda.synchronize()
        return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    return run
