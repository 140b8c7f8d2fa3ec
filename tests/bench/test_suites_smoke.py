"""The benchmark scripts in bench/ run their real code path on a tiny shape on the CPU (torch backend; times
meaningless), each as a subprocess exactly as a user starts it, so a runtime change that breaks a suite fails
here instead of on the GPU. Each must exit 0 and write records naming card, versions, commit, date and command
to its ``--out`` folder, never to bench/results/."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD_FIELDS = {"gpu", "torch", "triton", "commit", "time", "command"}     # card, versions, commit, date, command
IN_GIT = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode == 0

# script arguments -> the record files it must write
SMOKE = {
    "steps": (["bench/steps.py", "--shapes", "tiny", "--providers", "hf,torch", "--prefix", "64", "--iters", "2"],
              ["steps", "ceilings"]),
    "e2e": (["bench/e2e.py", "--shape", "tiny", "--batches", "1", "--prompt", "64", "--new", "32", "--hf-tokens", "2",
             "--backend", "torch"], ["e2e"]),
    "scoring": (["bench/scoring.py", "--shapes", "tiny", "--questions", "2", "--orig-questions", "1",
                 "--check-questions", "1", "--context", "40,70", "--backend", "torch"], ["scoring", "ceilings"]),
    "parity_gpu": (["bench/parity_gpu.py", "--shape", "tiny", "--prefix", "64", "--backends", "torch"], ["parity"]),
    "prefix_cache": (["bench/prefix_cache.py", "--shape", "tiny", "--layers", "2", "--questions", "8",
                      "--gen-questions", "2", "--new-tokens", "8", "--subjects", "2"], ["prefix_cache"]),
}


def _run(args, out, device):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("FASTDLLM_BENCH_OUT", "TRITON_INTERPRET"):      # as a user's shell: no Triton interpreter
        env.pop(name, None)
    proc = subprocess.run([sys.executable, *args, "--device", device, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, \
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _records(out, name):
    path = out / f"{name}.jsonl"
    assert path.exists(), f"no {name}.jsonl written to --out"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        assert RECORD_FIELDS <= row.keys(), f"{name}.jsonl record lacks {RECORD_FIELDS - row.keys()}"
        assert row["command"].startswith("python bench/") and (row["commit"] or not IN_GIT)
    return rows


def _results_state():
    folder = os.path.join(REPO, "bench", "results")
    return {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".jsonl")}


@pytest.mark.parametrize("suite", sorted(SMOKE))
def test_suite_runs_on_the_cpu_and_writes_its_records(suite, tmp_path):
    args, files = SMOKE[suite]
    before = _results_state()
    _run(args, tmp_path, "cpu")
    rows = {name: _records(tmp_path, name) for name in files}
    assert all(r["gpu"] == "cpu" and r["command"].endswith("--device cpu") for rs in rows.values() for r in rs)
    assert _results_state() == before, "a CPU run wrote to bench/results/"
    if suite == "steps":
        got = {(r["provider"], r["step"]) for r in rows["steps"]}
        assert {("torch", s) for s in ("full", "sub", "sub_skip12", "commit")} <= got
        assert {("hf", s) for s in ("full", "sub", "commit")} <= got
    if suite == "e2e":
        assert {r["provider"] for r in rows["e2e"]} == {"hf", "torch"}
        assert all(r["tokens"] > 0 for r in rows["e2e"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the CPU smoke runs are above)")
def test_steps_reports_the_graph_replay_alone_on_the_gpu(tmp_path):
    _run(["bench/steps.py", "--shapes", "tiny", "--providers", "triton", "--prefix", "64", "--iters", "3"],
         tmp_path, "cuda")
    rows = [r for r in _records(tmp_path, "steps") if r["provider"] == "triton"]
    assert {r["step"] for r in rows} == {"full", "sub", "sub_skip12", "commit"}
    for r in rows:
        assert 0 < r["graph_replay_p50_ms"] <= r["p80_ms"] * 1.5, r
