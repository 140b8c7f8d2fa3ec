"""The launcher's command line: our few options, lm-eval's own, and the defaults we set on lm-eval's.

lm-eval's parser reads every option it knows; the launcher then adjusts the parsed namespace (never the
argument text): the model defaults to ``fast_dllm_v2``, ``--batch_size`` to ``auto``, ``--device`` to the GPU
when there is one, our task folder joins ``--include_path``, model_args are checked against our table, and a
token given as a model_arg moves to ``HF_TOKEN`` before lm-eval can print it or save it in its results.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastdllm_rt.hub import looks_local, resolve_checkpoint

from . import model_args as margs
from .catalog import include_paths

USAGE = """\
usage: python -m evalbridge --model_args model=FOLDER_OR_HUB_ID[,name=value...] --tasks TASK[,TASK...]
                            [--output_dir DIR] [--config_tag TAG] [--skip_gated_check] [--debug]
                            [lm-eval options]
       fastdllm-eval ...   (the same command, installed by pip)

Runs lm-eval's `run` command on the fast_dllm_v2 model, with our local tasks (synth_*) beside lm-eval's.

  python -m evalbridge --model_args model=fastdllm_rt/small_model --tasks synth_arith,synth_mc_letter \\
      --limit 8 --output_dir results/demo
"""

OURS_HELP = """\
options of this launcher:
  --output_dir DIR     write summary.json there (and lm-eval's results under DIR/lm_eval unless --output_path)
  --config_tag TAG     label of this configuration in summary.json (default: derived from model_args)
  --skip_gated_check   do not check gated datasets (and the token for them) before loading the model
  --debug              show the full traceback of an error (also: FASTDLLM_DEBUG=1)

lm-eval options the launcher sets when they are not given:
  --model              fast_dllm_v2
  --batch_size         auto (lm-eval's own default is 1): the runtime sizes each chunk of requests to memory
  --device             cuda when a GPU is visible, else cpu
  --include_path DIR   your task folder is searched beside our local tasks (evalbridge/tasks)
"""


def our_options(argv):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--output_dir")
    ap.add_argument("--config_tag")
    ap.add_argument("--skip_gated_check", action="store_true")
    ap.add_argument("--debug", action="store_true")
    return ap.parse_known_args(argv)


def lm_eval_help() -> str:
    try:
        from lm_eval._cli.harness import HarnessCLI

        return HarnessCLI()._subparsers.choices["run"].format_help()
    except (ImportError, AttributeError, KeyError):        # another lm-eval layout: point at its own help
        return "lm-eval's options: see `lm-eval run --help`\n"


def help_text() -> str:
    return (f"{USAGE}\n{OURS_HELP}\nmodel_args of fast_dllm_v2 (--model_args name=value,...; [default]; an unknown "
            f"name is an error):\n{margs.help_text()}\n\nlm-eval's own options (passed on unchanged; `lm-eval run "
            f"--help` prints the same):\n\n{lm_eval_help()}")


def parse_lm_eval(rest):
    """lm-eval's parser applied to ``rest``: (the parser object, to run it, and the parsed namespace)."""
    from lm_eval._cli.harness import HarnessCLI

    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", "run", *rest]
    try:
        return cli, cli.parse_args()
    finally:
        sys.argv = saved


def prepare(ns) -> dict | None:
    """Set our defaults on lm-eval's namespace and check our model_args; returns them parsed (None when
    another model is asked for: its arguments are lm-eval's business)."""
    ns.include_path = include_paths(ns.include_path)
    if ns.model is None:
        ns.model = "fast_dllm_v2"
    if ns.model != "fast_dllm_v2":
        return None
    given = dict(ns.model_args or {})
    for name in [k for k in given if margs.looks_secret(k, given[k])]:
        value = given.pop(name)
        if name != "token":
            raise margs.ModelArgError(margs.unknown_message(name, value))
        os.environ["HF_TOKEN"] = str(value)          # huggingface_hub and the gated check read it there
    for name in ("batch_size", "max_batch_size", "device"):      # lm-eval passes these itself
        if name in given:
            if getattr(ns, name, None) is not None:     # --batch_size is absent from ns when not given
                raise margs.ModelArgError(f"{name} is given twice (--{name} and model_args); give it once")
            setattr(ns, name, given.pop(name))
    if not hasattr(ns, "batch_size"):
        ns.batch_size = "auto"
    ns.model_args = given
    if ns.device is None:                  # lm-eval's own default is CUDA even on machines without one
        import torch

        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    args = margs.parse({**given, "batch_size": ns.batch_size, "device": ns.device,
                        "max_batch_size": ns.max_batch_size})
    margs.reuse_policy(args)
    if looks_local(args["model"]):          # a missing folder is said now, not after lm-eval's task indexing
        resolve_checkpoint(args["model"])
    return args
