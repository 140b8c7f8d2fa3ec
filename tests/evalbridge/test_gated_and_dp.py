"""Gated datasets with a simulated hub (no network), secrets, and a two-process data-parallel run."""
import json
import os
import subprocess
import sys

import pytest

import lm_eval  # noqa: F401,E402  - the bridge is the lm-eval integration (pip install -e .[eval])

import fastdllm_rt  # noqa: E402
from evalbridge import gated  # noqa: E402
from evalbridge.__main__ import main  # noqa: E402
from tests.conftest import REPO  # noqa: E402

MODEL = fastdllm_rt.small_model_path()
SECRET = "hf_SimulatedSecretToken1234567890"
GATED_TASK = "gpqa_main_n_shot"          # lm-eval's own task; its dataset_path is Idavidrein/gpqa


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the gated-dataset check stopped the run")
    monkeypatch.setattr(fastdllm_rt, "load", refuse)


def test_token_resolution_order(clean_env, monkeypatch):
    assert gated.resolve_token() == (None, None)
    legacy = clean_env / "home" / ".huggingface"
    legacy.mkdir(parents=True)
    (legacy / "token").write_text("legacy-token\n")
    assert gated.resolve_token() == ("legacy-token", str(legacy / "token"))
    hf_home = clean_env / "hf_home"
    hf_home.mkdir()
    (hf_home / "token").write_text("file-token")
    assert gated.resolve_token()[0] == "file-token"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "old-env-token")
    assert gated.resolve_token() == ("old-env-token", "$HUGGING_FACE_HUB_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "env-token")
    assert gated.resolve_token() == ("env-token", "$HF_TOKEN")


def test_gpqa_is_found_as_gated_through_lm_evals_task_index():
    assert gated.task_datasets([GATED_TASK])[GATED_TASK] == "Idavidrein/gpqa"
    datasets = gated.task_datasets(["gpqa"])                      # a tag expands to its tasks
    assert datasets and set(datasets.values()) == {"Idavidrein/gpqa"}


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


ARGS = ["--model_args", f"model={MODEL}", "--tasks", f"synth_mc_letter,{GATED_TASK}", "--limit", "2"]


def test_no_token_stops_before_the_model_loads(clean_env, no_model_load, capsys, tmp_path):
    code, text = _run(ARGS + ["--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "no Hugging Face token was found" in text and "huggingface.co/datasets/Idavidrein/gpqa" in text
    assert not (tmp_path / "out").exists()


def test_token_without_access_stops_and_the_token_is_never_shown(clean_env, no_model_load, capsys, monkeypatch,
                                                                 tmp_path, caplog):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def refuse(self, repo_id, repo_type=None, token=None):
        assert token == SECRET and repo_type == "dataset"
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, f"403: access to {repo_id} is restricted")
        raise err

    monkeypatch.setattr(HfApi, "auth_check", refuse)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, text = _run(ARGS + ["--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "has no access to the gated dataset Idavidrein/gpqa" in text and "$HF_TOKEN" in text
    assert SECRET not in text and SECRET not in caplog.text


def test_offline_without_a_cached_copy_stops(clean_env, no_model_load, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code, text = _run(ARGS, capsys)
    assert code == 2 and "offline" in text and "no cached copy" in text and SECRET not in text


def test_offline_with_a_cached_copy_passes_the_check(clean_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = clean_env / "hf_home" / "hub" / "datasets--Idavidrein--gpqa" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "gpqa_main.csv").write_text("x")
    assert gated.preflight([GATED_TASK]) == []


def test_a_successful_run_with_a_token_writes_no_secret(clean_env, tmp_path):
    """The token given as a model argument moves to HF_TOKEN: lm-eval never prints or saves it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "evalbridge", "--model_args", f"model={MODEL},token={SECRET}",
                          "--tasks", "synth_mc_letter", "--limit", "4", "--output_dir", str(out)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert SECRET not in res.stdout and SECRET not in res.stderr
    for root, _, files in os.walk(out):
        for name in files:
            assert SECRET not in open(os.path.join(root, name), errors="ignore").read(), name
    summary = json.load(open(out / "summary.json"))
    assert summary["ignored_model_args"] == [] and "token" not in summary["model_args"]


def test_two_processes_give_the_metrics_of_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--model_args", f"model={MODEL}", "--tasks", "synth_mc_letter,synth_arith", "--limit", "8",
              "--batch_size", "8", "--seed", "0"]
    one = subprocess.run([sys.executable, "-m", "evalbridge", *common, "--output_dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert one.returncode == 0, one.stderr[-2000:]
    # torchrun's own module, so no PATH lookup is needed
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2", "-m", "evalbridge", *common, "--output_dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.load(open(tmp_path / "one" / "summary.json"))
    b = json.load(open(tmp_path / "two" / "summary.json"))
    assert b["world_size"] == 2
    for task in ("synth_mc_letter", "synth_arith"):
        assert a["metrics"][task] == b["metrics"][task]
    for kind in ("loglikelihood", "generate_until"):
        assert b["throughput"][kind]["ranks"] == 2
        assert a["throughput"][kind]["requests"] == b["throughput"][kind]["requests"]


LEAVES_THE_GROUP = """
import atexit, sys
import torch.distributed as td
from evalbridge.distributed import setup
d = setup()
assert d.world_size == 2 and td.is_initialized()
atexit._run_exitfuncs()                     # what the interpreter runs first when it exits
sys.exit(0 if not td.is_initialized() else 3)
"""


def test_each_process_leaves_the_process_group_before_it_exits(tmp_path):
    """A rank aborted at exit now and then ("terminate called without an active exception": gloo's threads
    torn down by the interpreter), after the results were written, and srun then cancelled the job step."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVES_THE_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
