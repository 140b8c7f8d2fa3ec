"""The lm-eval bridge, fully offline: the launcher on the local tasks with the shipped small model."""
import itertools
import json
import os
import subprocess
import sys

import pytest

import lm_eval  # noqa: F401,E402  - the bridge is the lm-eval integration (pip install -e .[eval])

import fastdllm_rt  # noqa: E402

MODEL = fastdllm_rt.small_model_path()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(tmp_path, *args, env=None, check=True):
    full_env = {**os.environ, **OFFLINE, **(env or {})}
    full_env.pop("HF_TOKEN", None) if env is None or "HF_TOKEN" not in env else None
    cmd = [sys.executable, "-m", "evalbridge", *args]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=full_env, capture_output=True, text=True, timeout=900)
    if check and res.returncode:
        raise AssertionError(f"launcher failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One launcher run over all four local task types."""
    out = tmp_path_factory.mktemp("demo")
    res = launch(out, "--model_args", f"model={MODEL}", "--tasks",
                 "synth_arith,synth_mc_letter,synth_mc_text,synth_prose", "--limit", "6", "--batch_size", "8",
                 "--output_dir", str(out / "run"))
    return json.load(open(out / "run" / "summary.json")), res


def test_launcher_writes_lm_eval_metrics_and_every_summary_field(demo):
    summary, res = demo
    for key in ("tasks", "config_tag", "metrics", "throughput", "reuse", "scoring", "model_args", "evaluation",
                "versions", "git_commit", "time", "complete", "runtime"):
        assert key in summary, key
    assert summary["complete"] is True and summary["scoring"] == "trajectory"
    m = summary["metrics"]
    assert set(m) == {"synth_arith", "synth_mc_letter", "synth_mc_text", "synth_prose"}
    assert 0.0 <= m["synth_arith"]["exact_match,strict-match"] <= 1.0
    assert 0.0 <= m["synth_mc_letter"]["acc,none"] <= 1.0
    assert m["synth_prose"]["word_perplexity,none"] > 1.0
    for name in ("torch", "triton", "lm_eval", "fastdllm", "python"):
        assert name in summary["versions"]
    assert summary["evaluation"]["limit"] == 6
    assert "synth_arith" in res.stdout and "generated tokens/s" in res.stdout


@pytest.mark.parametrize("kind, counted", [("generate_until", "tokens_generated"),
                                           ("loglikelihood", "continuation_tokens_scored"),
                                           ("loglikelihood_rolling", "continuation_tokens_scored")])
def test_throughput_is_recorded_for_every_request_type(demo, kind, counted):
    t = demo[0]["throughput"][kind]
    assert t["requests"] > 0 and t[counted] > 0 and t["tokens_forwarded"] > 0
    assert t["tokens_per_s_wall"] > 0 and t["wall_time_s"] > 0
    assert t["device_time_s"] is None                        # CPU: wall time only, and labelled so
    assert "wall only" in demo[0]["throughput"]["_device"]["clock"]
    assert sum(t["forwards"].values()) > 0 and t["tokens_per_forward"] > 0
    le = t["layer_evaluations"]
    assert le["computed"] + le["skipped"] == 28 * sum(t["row_forwards"].values())


def _evaluate(model_args, tasks, limit, num_fewshot=None, batch_size=16):
    """lm-eval in this process (one task manager, many configurations)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evalbridge import model as bridge
    from evalbridge.catalog import TASKS_DIR

    os.environ.update(OFFLINE)
    tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    res = lm_eval.simple_evaluate(model="fast_dllm_v2", model_args=model_args, tasks=tasks, limit=limit,
                                  task_manager=tm, num_fewshot=num_fewshot, device="cpu", batch_size=batch_size)
    return res["results"], bridge.FastDLLMv2LM.instances[-1].run_report()["throughput"]


def test_nine_reuse_configurations_on_one_token_choices_score_identically_and_skip_nothing():
    base = f"model={MODEL},use_block_cache=True"
    accs, reports = set(), []
    for k, subset in itertools.product((1, 2, 3), ("first", "middle", "last")):
        results, tp = _evaluate(f"{base},reuse_k={k},layer_subset={subset}", ["synth_mc_letter"], 12)
        accs.add(results["synth_mc_letter"]["acc,none"])
        ll = tp["loglikelihood"]
        assert ll["layer_evaluations"]["skipped"] == 0
        if k > 1:
            assert any("no layer evaluation was skipped" in n for n in ll["notes"])
        reports.append(ll)
    assert len(accs) == 1


def test_multi_token_choices_move_with_k_and_report_skips():
    base = f"model={MODEL},use_block_cache=True,layer_subset=middle"
    lls = {}
    for k in (1, 2, 3):
        results, tp = _evaluate(f"{base},reuse_k={k}", ["synth_mc_text"], 10)
        lls[k] = tp["loglikelihood"]
        assert (tp["loglikelihood"]["layer_evaluations"]["skipped"] > 0) == (k > 1)
    # the scores themselves move: compare the runtime's scores on the task's requests
    from evalbridge.tasks.local import _split
    rt = fastdllm_rt.load(MODEL)
    docs = _split("mc_text", "test")[:10]
    reqs = [(rt.tokenizer.encode(d["prompt"]), rt.tokenizer.encode(" " + c))
            for d in docs for c in d["choices"]]
    scores = {k: rt.score(reqs, use_block_cache=True, reuse=fastdllm_rt.ReusePolicy.from_args(k, "middle")).loglikelihoods
              for k in (1, 2, 3)}
    assert scores[1] != scores[2] and scores[2] != scores[3]


def test_lm_evals_auto_batch_size_serves_loglikelihood_and_rolling():
    """``--batch_size auto`` reaches the runtime as "size chunks to memory" and scores what a fixed size does."""
    tasks = ["synth_mc_text", "synth_prose"]
    auto, tp_auto = _evaluate(f"model={MODEL}", tasks, 6, batch_size="auto")
    fixed, _ = _evaluate(f"model={MODEL}", tasks, 6, batch_size=2)
    from evalbridge import model as bridge

    assert bridge.FastDLLMv2LM.instances[-2].batch_size is None
    assert auto["synth_mc_text"]["acc,none"] == fixed["synth_mc_text"]["acc,none"]
    assert auto["synth_prose"]["word_perplexity,none"] == pytest.approx(fixed["synth_prose"]["word_perplexity,none"],
                                                                         rel=1e-5)
    assert tp_auto["loglikelihood"]["requests"] > 0 and tp_auto["loglikelihood_rolling"]["requests"] == 6


def test_five_shot_four_choice_costs_one_scoring_forward_plus_the_shared_prefill():
    """The original adapter ran four full forwards per question; trajectory scoring runs one prefill of the
    shared five-shot context and one scoring forward for the four one-token choices."""
    n = 8
    results, tp = _evaluate(f"model={MODEL}", ["synth_mc_letter"], n, num_fewshot=5)
    rf = tp["loglikelihood"]["row_forwards"]
    assert tp["loglikelihood"]["requests"] == 4 * n
    # each question's own context blocks once, and the shared five-shot header's whole blocks once for all
    # (the prefix cache serves them to the other questions)
    assert rf["prefill"] + rf["commit"] <= n + 1
    cache = tp["loglikelihood"]["prefix_cache"]
    assert cache["tokens_served"] >= (n - 1) * 32 and tp["loglikelihood"]["prefix_served_fraction"] > 0.5
    off, tp_off = _evaluate(f"model={MODEL},prefix_cache=False", ["synth_mc_letter"], n, num_fewshot=5)
    assert off == results                                         # the switch changes the cost, not the numbers
    assert tp_off["loglikelihood"]["row_forwards"]["prefill"] == n
    assert tp_off["loglikelihood"]["prefix_cache"]["tokens_served"] == 0
    assert rf["full_block"] + rf["prefill"] + rf["commit"] + rf["sub_block"] <= 2 * n + 1
    assert rf["full_block"] <= n


def test_stop_strings_end_generations_and_token_counts_match_the_text():
    from lm_eval.api.instance import Instance

    from evalbridge.model import FastDLLMv2LM

    lm = FastDLLMv2LM(model=MODEL, device="cpu", batch_size=4)
    prompts = ["Question: Mia has 12 apples. Mia gets 30 more apples. How many apples does Mia have now?\nAnswer:",
               "Question: Tom has 50 cards. Tom gives away 20 cards. How many cards does Tom have left?\nAnswer:"]
    free = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 48}), 0)
                              for p in prompts])
    assert all("=" in t for t in free)
    cut = lm.generate_until([Instance("generate_until", {}, (p, {"until": [" ="], "max_gen_toks": 48}), 0)
                             for p in prompts])
    for a, b in zip(free, cut):
        assert b == a.split(" =")[0] and " =" not in b
    tp = lm.throughput.to_dict()["generate_until"]
    out = lm.rt.generate([lm.tokenizer.encode(p) for p in prompts], max_new_tokens=48, stop_strings=[" ="],
                         use_block_cache=False)
    assert out.stats.tokens_generated == sum(len(t) for t in out.tokens)
    assert [lm.tokenizer.decode(t).split(" =")[0] for t in out.tokens] == cut
    assert tp["tokens_generated"] > 0


def test_registering_keeps_lm_evals_own_models():
    from lm_eval.api.registry import get_model, model_registry

    import evalbridge.model  # noqa: F401
    assert get_model("fast_dllm_v2").__name__ == "FastDLLMv2LM"
    # lm-eval's own names stay registered ("hf" is only looked up: building it needs accelerate)
    assert "hf" in model_registry and get_model("dummy").__name__ == "DummyLM"


def test_bad_model_args_are_explained():
    from evalbridge.model import FastDLLMv2LM

    with pytest.raises(ValueError, match="needs use_block_cache=True"):
        FastDLLMv2LM(model=MODEL, device="cpu", reuse_k=2)
    with pytest.raises(ValueError, match="needs model="):
        FastDLLMv2LM(device="cpu")
    with pytest.raises(fastdllm_rt.PolicyError, match="do not exist"):
        FastDLLMv2LM(model=MODEL, device="cpu", reuse_k=2, use_block_cache=True, layer_subset="20-40")


def test_rolling_loglikelihood_is_score_rolling_over_lm_evals_windows():
    """The bridge calls Runtime.score_rolling (it re-implemented it before); the totals are still those of
    scoring lm-eval's own rolling windows, several per document here."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from evalbridge.model import FastDLLMv2LM
    from evalbridge.tasks.local import _split

    lm = FastDLLMv2LM(model=MODEL, device="cpu", max_length=12)
    texts = [d["text"] for d in _split("prose", "test")[:3]]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts])
    expected = []
    for text in texts:
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=lm.tokenizer.encode(text), prefix_token=lm.prefix_token_id, max_seq_len=12, context_len=1)]
        assert len(windows) > 1
        res = lm.rt.score([(list(c), list(x)) for c, x in windows], **lm._score_kwargs())
        expected.append(sum(res.loglikelihoods))
    assert got == pytest.approx(expected, rel=1e-6)
    assert lm.throughput.to_dict()["loglikelihood_rolling"]["requests"] == 3
