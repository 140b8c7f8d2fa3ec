"""Launcher: lm-eval's command line with the ``fast_dllm_v2`` model, our local tasks beside lm-eval's, checks
that stop a run before the model loads (model_args, task names, gated datasets), and summary.json.

    python -m evalbridge --model_args model=fastdllm_rt/small_model --tasks synth_arith,synth_mc_letter \\
        --limit 8 --output_dir results/demo

``python -m evalbridge --help`` lists our options, every model_arg and lm-eval's options. A user's mistake ends
in one line on stderr and exit status 2; ``--debug`` (or FASTDLLM_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

from fastdllm_rt.errors import FastDLLMError

from . import cli
from .catalog import Catalog


class GatedDatasetError(FastDLLMError):
    """A selected task reads a gated dataset this machine cannot read."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTDLLM_DEBUG", "").strip() not in ("", "0")
    try:
        return _launch(argv)
    except (FastDLLMError, ValueError) as e:
        if debug:
            raise
        print(f"[fastdllm] error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _one_line(error) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    token = os.environ.get("HF_TOKEN", "").strip()
    return text.replace(token, "<token>") if token else text


def _launch(argv) -> int:
    if argv[:1] == ["run"]:
        argv = argv[1:]
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(cli.help_text())
        return 0
    ours, rest = cli.our_options(argv)
    from lm_eval.utils import setup_logging

    setup_logging()
    harness, ns = cli.parse_lm_eval(rest)
    cli.prepare(ns)
    tasks = list(ns.tasks or [])
    catalog = Catalog(ns.include_path)
    catalog.check(tasks)
    if not ours.skip_gated_check and tasks:
        from .gated import preflight

        problems = preflight(tasks, catalog)
        if problems:
            raise GatedDatasetError("; ".join(f"task {p.task} cannot run: {p.message}" for p in problems)
                                    + " Stopped before loading the model; nothing was written.")
    if ours.output_dir and not ns.output_path:
        ns.output_path = os.path.join(ours.output_dir, "lm_eval")

    from . import model as bridge

    started = time.time()
    with _profiler():
        harness.execute(ns)
    lm = bridge.FastDLLMv2LM.instances[-1] if bridge.FastDLLMv2LM.instances else None
    if lm is None:
        return 0
    reports = lm.dist.gather_object(lm.run_report(), dst=0)
    if int(os.environ.get("RANK", "0")) != 0 or not ours.output_dir:
        return 0
    _write_summary(ns, ours, tasks, reports, started)
    return 0


def _write_summary(ns, ours, tasks, reports, started):
    from .gated import resolve_token
    from .summary import build, write_atomic

    lm_results = _newest_results(ns.output_path, started) if ns.output_path else None
    limit = ns.limit if ns.limit is None or ns.limit != int(ns.limit) else int(ns.limit)
    eval_params = {"limit": limit, **{k: getattr(ns, k, None) for k in (
        "num_fewshot", "batch_size", "gen_kwargs", "seed", "apply_chat_template", "fewshot_as_multiturn")}}
    if lm_results:
        eval_params["lm_eval_config"] = {k: v for k, v in lm_results.get("config", {}).items() if k != "model_args"}
        eval_params["n_shot"] = lm_results.get("n-shot", {})
    summary = build(tasks=tasks, config_tag=ours.config_tag or _config_tag(reports[0]["model_args"]),
                    lm_results=lm_results, reports=reports, eval_params=eval_params,
                    secrets=[resolve_token()[0] or ""])
    path = os.path.join(ours.output_dir, "summary.json")
    write_atomic(path, summary)
    _print_summary(summary, path)


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
        counted = t["tokens_counted"].replace("tokens_generated", "generated tokens").replace("_", " ")
        fwd = t.get("forwarded_tokens_per_s_wall")
        forwarded = f"{fwd:.0f} forwarded tokens/s, " if fwd else ""
        print(f"  {kind}: {t['tokens_per_s_wall']:.1f} {counted}/s (wall clock)"
              + (f", {dev:.1f}/s (device)" if dev else "")
              + f"; {forwarded}{t['tokens_per_forward']:.2f} tokens/forward; "
                f"{t['layer_evaluations']['skipped']} layer evaluations skipped")


if __name__ == "__main__":
    sys.exit(main())
