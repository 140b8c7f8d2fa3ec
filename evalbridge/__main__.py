"""Launcher: lm-eval's command line with the ``fast_dllm_v2`` model registered, our local tasks on the task
path, a gated-dataset check before any model is loaded, and ``--output_dir`` for summary.json.

    python -m evalbridge --model_args model=fastdllm_rt/small_model --tasks synth_arith,synth_mc_letter \\
        --batch_size 32 --output_dir results/demo

Options of ours (everything else goes to lm-eval unchanged):
  --output_dir DIR        where summary.json (and lm-eval's own results, unless --output_path) go
  --config_tag TAG        label of this configuration in summary.json (default: derived from model_args)
  --skip_gated_check      do not check gated datasets first
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def _ours(argv):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--output_dir")
    ap.add_argument("--config_tag")
    ap.add_argument("--skip_gated_check", action="store_true")
    return ap.parse_known_args(argv)


def _peek(argv):
    """The lm-eval arguments the launcher itself needs (parsed again, fully, by lm-eval)."""
    ap = argparse.ArgumentParser(add_help=False)
    for flag in ("--model", "--model_args", "--include_path", "--output_path", "--limit", "--num_fewshot",
                 "--batch_size", "--gen_kwargs", "--seed", "--device"):
        ap.add_argument(flag)
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--apply_chat_template", nargs="?", const=True, default=False)
    ap.add_argument("--fewshot_as_multiturn", nargs="?", const=True, default=False)
    known, _ = ap.parse_known_args(argv)
    known.tasks = [t for part in (known.tasks or []) for t in part.split(",") if t]
    return known


def _include_path(user_path):
    """Our task folder, plus the user's when given (lm-eval takes one path: both are linked under one)."""
    if not user_path:
        return TASKS_DIR
    root = tempfile.mkdtemp(prefix="fastdllm_tasks_")
    os.symlink(TASKS_DIR, os.path.join(root, "fastdllm"))
    os.symlink(os.path.abspath(user_path), os.path.join(root, "user"))
    return root


def _replace_arg(argv, flag, value):
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


def _config_tag(model_args: dict) -> str:
    k = int(model_args.get("reuse_k", 1))
    base = f"k{k}_{model_args['layer_subset']}_{model_args['reuse_mode']}" if k > 1 else "k1"
    return f"{base}_{model_args['scoring']}"


def _newest_results(folder, since):
    files = [f for f in glob.glob(os.path.join(folder, "**", "results*.json"), recursive=True)
             if os.path.getmtime(f) >= since - 1]
    if not files:
        return None
    with open(max(files, key=os.path.getmtime)) as f:
        return json.load(f)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        argv = argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    ours, rest = _ours(argv)
    peek = _peek(rest)
    if peek.model_args and "token=" in peek.model_args:
        # a token given as a model argument goes to HF_TOKEN for this process (model download and gated
        # datasets both read it there) and out of the arguments lm-eval prints and saves
        kept = []
        for item in peek.model_args.split(","):
            if item.strip().startswith("token="):
                os.environ["HF_TOKEN"] = item.split("=", 1)[1].strip()
            else:
                kept.append(item)
        peek.model_args = ",".join(kept)
        rest = _replace_arg(rest, "--model_args", peek.model_args)
    rank = int(os.environ.get("RANK", "0"))
    include = _include_path(peek.include_path)
    rest = _replace_arg(rest, "--include_path", include)
    if peek.model is None:
        rest = ["--model", "fast_dllm_v2"] + rest
    if peek.device is None:                  # lm-eval's own default is CUDA even on machines without one
        import torch

        rest += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    if not ours.skip_gated_check and peek.tasks:
        from .gated import preflight

        problems = preflight(peek.tasks, include)
        if problems:
            for p in problems:
                print(f"[fastdllm] cannot run task {p.task}: {p.message}", file=sys.stderr)
            print("[fastdllm] stopped before loading the model; nothing was written.", file=sys.stderr)
            return 2
    output_dir = ours.output_dir
    if output_dir and not peek.output_path:
        rest = _replace_arg(rest, "--output_path", os.path.join(output_dir, "lm_eval"))
    results_dir = peek.output_path or (os.path.join(output_dir, "lm_eval") if output_dir else None)

    from . import model as _registers  # noqa: F401 - registers fast_dllm_v2 with lm-eval
    from lm_eval.__main__ import cli_evaluate

    started = time.time()
    saved = sys.argv
    sys.argv = ["lm-eval", "run"] + rest
    try:
        with _profiler():
            cli_evaluate()
    finally:
        sys.argv = saved
    lm = _registers.FastDLLMv2LM.instances[-1] if _registers.FastDLLMv2LM.instances else None
    if lm is None:
        return 0
    reports = lm.dist.gather_object(lm.run_report(), dst=0)
    if rank != 0 or not output_dir:
        return 0
    from .gated import resolve_token
    from .summary import build, write_atomic

    lm_results = _newest_results(results_dir, started) if results_dir else None
    eval_params = {k: getattr(peek, k) for k in ("limit", "num_fewshot", "batch_size", "gen_kwargs", "seed",
                                                 "apply_chat_template", "fewshot_as_multiturn")}
    if lm_results:
        eval_params["lm_eval_config"] = {k: v for k, v in lm_results.get("config", {}).items() if k != "model_args"}
        eval_params["n_shot"] = lm_results.get("n-shot", {})
    summary = build(tasks=peek.tasks, config_tag=ours.config_tag or _config_tag(reports[0]["model_args"]),
                    lm_results=lm_results, reports=reports, eval_params=eval_params,
                    secrets=[resolve_token()[0] or ""])
    path = os.path.join(output_dir, "summary.json")
    write_atomic(path, summary)
    _print_summary(summary, path)
    return 0


def _profiler():
    """nsys capture range (FASTDLLM_PROFILE=1: opened at the first harness call, closed here) or the torch
    profiler fallback (FASTDLLM_TORCH_PROFILE=trace.json), whose ranges name the forward kinds."""
    import contextlib

    import torch

    trace = os.environ.get("FASTDLLM_TORCH_PROFILE")
    if trace:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

        @contextlib.contextmanager
        def run():
            with profile(activities=acts) as prof:
                yield
            os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
            prof.export_chrome_trace(trace)
        return run()

    @contextlib.contextmanager
    def nsys_range():
        try:
            yield
        finally:
            from .throughput import Throughput

            if Throughput._capture_open:
                torch.cuda.profiler.stop()
    return nsys_range()


def _print_summary(summary, path):
    print(f"\n[fastdllm] {summary['config_tag']}: summary written to {path}")
    for task, metrics in summary["metrics"].items():
        shown = {k.split(",")[0]: round(v, 4) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "stderr" not in k}
        print(f"  {task}: {shown}")
    for kind, t in summary["throughput"].items():
        if kind.startswith("_"):
            continue
        dev = t["tokens_per_s_device"]
        print(f"  {kind}: {t['tokens_per_s_wall']:.1f} {t['tokens_counted']}/s (wall)"
              + (f", {dev:.1f}/s (device)" if dev else "")
              + f", {t['tokens_per_forward']:.2f} tokens/forward, {t['layer_evaluations']['skipped']} layer "
                f"evaluations skipped")


if __name__ == "__main__":
    sys.exit(main())
