"""The tiling sweep's tool surface (runnable as a module of the installed package), its candidate tilings, and
the measurement records it shares with bench/."""
import json
import os
import subprocess
import sys

from fastdllm_kernels.linear.configs import LinearConfig, m_bucket
from fastdllm_kernels.linear.sweep import SHAPES, candidates, projections, qkv_rope_candidates
from fastdllm_kernels.timing import append_record, cuda_time


def test_sweep_runs_as_a_module_of_the_installed_package():
    out = subprocess.run([sys.executable, "-m", "fastdllm_kernels.linear.sweep", "--help"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    assert "tuned.json" in out.stdout and "--record" in out.stdout


def test_candidates_fit_shared_memory_and_swap_only_wide_tiles():
    for M in (8, 32):
        for name, p in projections(SHAPES["7B"]).items():
            swiglu = p.get("swiglu", False)
            cfgs = list(candidates(M, p["N"], p["K"], swiglu, num_sms=132, swap_ab=True))
            assert cfgs, (name, M)
            for c in cfgs:
                assert isinstance(c, LinearConfig) and c.block_m == m_bucket(M)
                stage_bytes = (c.block_n * (2 if swiglu else 1) + c.block_m) * c.block_k * 2
                assert c.num_stages * stage_bytes <= 200 << 10, c
                assert not c.swap_ab or c.block_n >= 64, c
                assert c.split_k == 1 or p["K"] // c.split_k >= 2 * c.block_k, c


def test_qkv_rope_tiles_divide_half_the_head():
    f = SHAPES["1.5B"]
    D = f["hidden_size"] // f["num_attention_heads"]
    cfgs = list(qkv_rope_candidates(8, 2048, f["hidden_size"], D, num_sms=132))
    assert cfgs and all((D // 2) % c.block_n == 0 for c in cfgs)


def test_record_names_card_versions_commit_date_and_command(tmp_path):
    path = tmp_path / "sub" / "suite.jsonl"
    t = cuda_time(lambda: sum(range(100)), warmup=1, iters=5)
    assert t["p20_ms"] <= t["p50_ms"] <= t["p80_ms"]
    append_record(str(path), {"op": "x", **t, "command": "python -m something"})
    append_record(str(path), {"op": "y", "command": "python -m something"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["op"] for r in rows] == ["x", "y"]
    for r in rows:
        assert {"gpu", "torch", "triton", "commit", "time", "command"} <= set(r)
        assert r["time"][:4].isdigit() and "run" not in r
