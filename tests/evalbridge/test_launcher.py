"""The launcher as a user meets it: its help, one-line errors for common mistakes, secrets kept out of
lm-eval's output, and a user's own task folder beside ours. Offline; the shipped small model."""
import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

import lm_eval  # noqa: F401  - the bridge is the lm-eval integration (pip install -e .[eval])

import fastdllm_rt
from evalbridge.__main__ import main

MODEL = fastdllm_rt.small_model_path()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SECRET = "hf_MistypedSecretToken0987654321"
# model_args a user of the original adapter and of the reuse study sets; --help must explain each
STUDY_ARGS = ["model", "dtype", "device", "backend", "batch_size", "max_new_tokens", "threshold", "bd_size",
              "small_block_size", "use_block_cache", "reuse_k", "layer_subset", "subset_size", "reuse_mode",
              "scoring", "reveal", "early_exit"]


def launch(cwd, *args, exe=(sys.executable, "-m", "evalbridge"), timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "FASTDLLM_DEBUG")}
    return subprocess.run([*exe, *args], cwd=str(cwd), env={**env, **OFFLINE}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def help_text(tmp_path_factory):
    res = launch(tmp_path_factory.mktemp("help"), "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_help_lists_every_model_arg_with_its_default(help_text):
    """Defect: --help showed lm-eval's help and three launcher options, none of the model_args."""
    from evalbridge.model_args import TABLE

    lines = help_text.splitlines()
    for name in STUDY_ARGS + [a.name for a in TABLE]:
        row = [ln for ln in lines if ln.split()[:1] == [name]]
        assert row, f"--help does not explain model_arg {name}"
    use_block_cache = next(ln for ln in lines if ln.split()[:1] == ["use_block_cache"])
    assert use_block_cache.split()[1] == "False"
    assert "--num_fewshot" in help_text and "--output_dir" in help_text and "--debug" in help_text


def test_help_says_batch_size_defaults_to_auto(help_text):
    """Defect: the launcher's batch size was lm-eval's 1 when --batch_size was not given, and --help did not
    say what the default is."""
    assert any(ln.split()[:2] == ["--batch_size", "auto"] for ln in help_text.splitlines())


def test_console_script_prints_the_same_help(help_text, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fastdllm-eval")
    assert os.path.isfile(script), "fastdllm-eval is not installed beside this python (pip install -e .)"
    res = launch(tmp_path, "--help", exe=(script,))
    assert res.returncode == 0 and res.stdout == help_text


def _fails_in_one_line(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    err = [ln for ln in out.err.splitlines() if ln.startswith("[fastdllm]")]
    assert code == 2, out.err[-2000:]
    assert len(err) == 1 and "Traceback" not in out.err, out.err[-2000:]
    return err[0]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("FASTDLLM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("model_args, words", [
    ("use_blok_cache=True", ["unknown model_arg use_blok_cache", "did you mean use_block_cache?",
                             "accepted: model,"]),
    ("reuse_k=0", ["reuse k must be an integer >= 1"]),
    ("reuse_k=2", ["needs use_block_cache=True"]),
    ("reuse_k=2,use_block_cache=True,layer_subset=bogus", ["'bogus' are not understood"]),
    ("threshold=high", ["threshold='high' is not a number"]),
    ("scoring=trajectroy", ["choose one of trajectory, first_token"]),
])
def test_bad_model_args_end_in_one_line_before_lm_eval_starts(offline, capsys, model_args, words):
    """Defect: unknown model_args were silently ignored (use_blok_cache=True ran with the block cache off,
    rc 0), and a bad policy ended in a 20-45 line traceback with the message last."""
    line = _fails_in_one_line(capsys, ["--model_args", f"model={MODEL},{model_args}", "--tasks", "synth_arith",
                                       "--limit", "1", "--output_dir", str(offline / "out")])
    for w in words:
        assert w in line
    assert not (offline / "out").exists()


def test_the_model_rejects_unknown_args_in_lm_evals_own_api_too():
    from evalbridge.model import FastDLLMv2LM
    from evalbridge.model_args import ModelArgError

    with pytest.raises(ModelArgError, match="did you mean use_block_cache"):
        FastDLLMv2LM(model=MODEL, device="cpu", use_blok_cache=True)


def test_debug_brings_the_traceback_back(offline):
    from fastdllm_rt import PolicyError

    with pytest.raises(PolicyError):
        main(["--model_args", f"model={MODEL},reuse_k=2", "--tasks", "synth_arith", "--debug"])


def test_a_mistyped_local_path_is_a_missing_folder_with_the_nearest_name(offline, capsys):
    """Defect: `fastdllm_rt/small_modl` was sent to the hub and reported as "could not reach the hub ... check
    the network"."""
    (offline / "fastdllm_rt" / "small_model").mkdir(parents=True)
    line = _fails_in_one_line(capsys, ["--model_args", "model=fastdllm_rt/small_modl", "--tasks", "synth_arith"])
    assert "no folder fastdllm_rt/small_modl" in line and "did you mean fastdllm_rt/small_model?" in line
    assert "network" not in line and "hub to download" not in line


def test_a_mistyped_token_argument_is_neither_echoed_nor_saved(tmp_path):
    """Defect: `hf_token=...` was passed to lm-eval, which printed it and saved it in its results (twice)."""
    res = launch(tmp_path, "--model_args", f"model={MODEL},hf_token={SECRET}", "--tasks", "synth_mc_letter",
                 "--limit", "1", "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 2
    assert SECRET not in res.stdout + res.stderr
    assert "unknown model_arg hf_token (its value is not shown); did you mean token?" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, close", [("synth_arth", "synth_arith"), ("hellaswg", "hellaswag")])
def test_an_unknown_task_lists_close_names_and_our_local_tasks(offline, capsys, task, close):
    """Defect: an unknown task ended in lm-eval's traceback ("ValueError: Tasks not found") with no hint."""
    line = _fails_in_one_line(capsys, ["--model_args", f"model={MODEL}", "--tasks", f"synth_mc_letter,{task}"])
    assert f"unknown task '{task}'" in line and close in line.split("did you mean")[1].split("?")[0]
    assert "local tasks: synth, synth_arith, synth_mc_letter, synth_mc_text, synth_prose" in line


USER_TASK = """\
task: my_yes_no
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: gold
metric_list:
  - metric: acc
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def user_folder_run(tmp_path_factory):
    """One launcher run: a task folder outside the repository beside one of ours, a token given as a
    model_arg, and no --batch_size."""
    root = tmp_path_factory.mktemp("user")
    tasks = root / "my_tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text('{"question": "Is 2 more than 1?", "gold": 0}\n'
                                      '{"question": "Is 1 more than 2?", "gold": 1}\n')
    (tasks / "my_yes_no.yaml").write_text(USER_TASK.format(data=tasks / "data.jsonl"))
    assert not str(tasks).startswith(REPO)
    res = launch(root, "--model_args", f"model={MODEL},token={SECRET}", "--tasks", "my_yes_no,synth_mc_letter",
                 "--limit", "1", "--include_path", str(tasks), "--output_dir", str(root / "out"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = glob.glob(str(root / "out" / "lm_eval" / "**" / "results*.json"), recursive=True)
    return res, root / "out", json.load(open(results[0]))


def test_a_users_task_folder_outside_the_repository_works_beside_ours(user_folder_run):
    """Defect: with --include_path both folders were linked under a temporary root; lm-eval's discovery does
    not follow links, so neither task was found ("Tasks not found")."""
    _, out, results = user_folder_run
    assert set(results["results"]) == {"my_yes_no", "synth_mc_letter"}
    summary = json.load(open(out / "summary.json"))
    assert "acc,none" in summary["metrics"]["my_yes_no"]


def test_the_default_batch_size_is_auto(user_folder_run):
    """Defect: without --batch_size the launcher ran lm-eval's default of 1."""
    _, out, results = user_folder_run
    assert results["config"]["batch_size"] == "auto"
    assert json.load(open(out / "summary.json"))["model_args"]["batch_size"] == "auto"


def test_a_token_model_arg_never_reaches_lm_evals_output(user_folder_run):
    res, out, results = user_folder_run
    assert "token" not in results["config"]["model_args"]
    assert SECRET not in res.stdout + res.stderr
    for path in glob.glob(str(out / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            assert SECRET not in open(path, errors="ignore").read(), path


def test_evalbridge_modules_import_no_circle():
    """Defect: gated.py imported private names from __main__.py, which imported gated.py."""
    folder = os.path.join(REPO, "evalbridge")
    graph = {}
    for path in glob.glob(os.path.join(folder, "*.py")):
        name = os.path.basename(path)[:-3]
        graph[name] = {a.module.split(".")[0] if a.module else a.names[0].name
                       for a in ast.walk(ast.parse(open(path).read()))
                       if isinstance(a, ast.ImportFrom) and a.level == 1}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph.get(start, ()))
    assert [m for m in graph if reaches(m, m)] == []


# a section sign after a document's name: a citation of a document the repository does not hold
OUTSIDE_CITATION = re.compile("(?:contract|spec) \u00a7")
MD_NAME = re.compile(r"[\w.-]+\.md\b")


def test_no_reference_to_documents_outside_the_repository():
    """Defect: docstrings cited sections of design documents the repository does not hold, and comments named
    a style guide that lives outside it. Every ``*.md`` the tree names must be a file of the tree."""
    held = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)}
    held.add("results.md")                                   # the table the collector writes
    files = [p for d in ("evalbridge", "fastdllm_rt", "kernels", "sbatch", "docs", "bench", "tests", "scripts", ".ci")
             for p in glob.glob(os.path.join(REPO, d, "**", "*"), recursive=True)
             if p.endswith((".py", ".sh", ".md", ".json", ".yaml", ".txt", "run"))]
    files += [os.path.join(REPO, n) for n in ("README.md", "CONTRIBUTING.md", "setup.py")]
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        assert not OUTSIDE_CITATION.search(text), path
        assert set(MD_NAME.findall(text)) <= held, (path, sorted(set(MD_NAME.findall(text)) - held))
