"""The ``fast_dllm_v2`` model_args: one table gives each name, default, type and meaning.

The lm-eval model parses its keyword arguments with it, the launcher checks them before anything slow starts,
and ``--help`` prints it. An unknown name is an error: a typo such as ``use_blok_cache`` would otherwise run
another configuration under the intended label. Names keep the original adapter's spelling so its commands
still work, and so do its defaults (block cache off, threshold 0.9, block 32, sub-block 8).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

from fastdllm_rt.errors import ConfigError


class ModelArgError(ConfigError):
    """A model_arg name or value the model cannot take."""


def _bool(name, v):
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ModelArgError(f"model_arg {name}={v!r} is not a boolean; write {name}=True or {name}=False")


def _number(kind):
    what = "an integer" if kind is int else "a number"

    def to_number(name, v):
        try:
            if isinstance(v, bool):
                raise ValueError
            out = kind(v)
            if kind is int and out != float(v):
                raise ValueError
        except (TypeError, ValueError):
            raise ModelArgError(f"model_arg {name}={v!r} is not {what}") from None
        return out
    return to_number


def _optional(to_value):
    return lambda name, v: None if str(v).strip().lower() in ("", "none", "auto") else to_value(name, v)


def _text(name, v):
    return str(v)


def _choice(*choices):
    def one_of(name, v):
        if str(v) not in choices:
            raise ModelArgError(f"model_arg {name}={v!r} is unknown; choose one of {', '.join(choices)}")
        return str(v)
    return one_of


def _batch(name, v):
    return "auto" if str(v).startswith("auto") else _number(int)(name, v)


@dataclass(frozen=True)
class Arg:
    name: str
    default: Any
    convert: Callable
    help: str


def _table() -> tuple[Arg, ...]:
    from fastdllm_rt.reuse import MODES
    from fastdllm_rt.config import REVEAL_MODES, SCORING_MODES

    i, f, oi = _number(int), _number(float), _optional(_number(int))
    return (
        Arg("model", None, _text, "checkpoint folder or hub id (owner/name); required"),
        Arg("model_path", None, _text, "the original adapter's name for model"),
        Arg("revision", None, _text, "hub branch, tag or commit of model"),
        Arg("token", None, _text, "Hugging Face token: moved to HF_TOKEN, never printed or saved "
                                  "(prefer `export HF_TOKEN=...`)"),
        Arg("dtype", "auto", _text, "auto (bf16 on a GPU, fp32 on the CPU), bf16, fp16 or fp32"),
        Arg("device", None, _optional(_text), "cuda, cuda:N or cpu (lm-eval's --device sets it); default: "
                                              "this rank's GPU, else the CPU"),
        Arg("backend", None, _optional(_text), "triton or torch; default: triton on a GPU where the kernels "
                                               "fit the model, else torch"),
        Arg("batch_size", "auto", _batch, "requests per runtime call, or auto: chunks sized to memory "
                                          "(lm-eval's --batch_size sets it)"),
        Arg("max_batch_size", None, oi, "set by lm-eval's --max_batch_size; not used (auto is bounded by "
                                        "memory)"),
        Arg("trust_remote_code", False, _bool, "set by lm-eval's --trust_remote_code; not used (the runtime "
                                               "runs its own model code)"),
        Arg("max_new_tokens", 2048, i, "generation limit where a task sets no max_gen_toks"),
        Arg("max_length", None, oi, "longest request in tokens; default: the model's positions minus two "
                                    "blocks"),
        Arg("threshold", 0.9, f, "confidence a masked token needs to be revealed in a denoising step"),
        Arg("bd_size", 32, i, "block size in tokens; must equal the checkpoint's (config.json bd_size)"),
        Arg("small_block_size", 8, i, "sub-block size in tokens (divides the block size)"),
        Arg("use_block_cache", False, _bool, "keep the block's KV between sub-block steps (reuse needs it)"),
        Arg("reuse_k", 1, i, "recompute the reused layers every k-th sub-block step; 1 = no reuse"),
        Arg("layer_subset", "first", _text, "reused layers: first, middle, last, a range such as 8-19, or a "
                                            "list such as 1;3;5"),
        Arg("subset_size", 12, i, "how many layers a named layer_subset holds"),
        Arg("reuse_mode", "output", _choice(*MODES), "what a skipped layer reuses: " + " or ".join(MODES)),
        Arg("scoring", "trajectory", _choice(*SCORING_MODES),
            "trajectory: log-likelihood along the denoising trajectory (docs/design.md, \"Trajectory "
            "scoring\"); first_token: one plain forward, as the original adapter"),
        Arg("reveal", "one", _choice(*REVEAL_MODES), "trajectory scoring reveals one token per step, or every "
                                                     "token above the threshold"),
        Arg("prefix_cache", True, _bool, "compute the whole blocks of a shared few-shot header once and serve "
                                          "them from a prefix cache (exact; False to compare)"),
        Arg("prefix_cache_bytes", None, oi, "the prefix cache's memory budget; default: 15% of the free memory"),
        Arg("early_exit", False, _bool, "stop generating a row once it has produced a stop string"),
        Arg("prompt_rewrite", True, _bool, "ask gsm8k/minerva_math for a \\boxed{} answer, as the original "
                                           "evaluation did"),
        Arg("mask_token_id", None, oi, "override the mask token id (default: tokenizer, config, released)"),
        Arg("stop_token_id", None, oi, "override the stop token id"),
        Arg("pad_token_id", None, oi, "override the padding token id"),
    )


TABLE = _table()
NAMES = tuple(a.name for a in TABLE)
_SECRET_NAME = re.compile(r"token|auth|secret|password|api_?key", re.I)
_SECRET_VALUE = re.compile(r"^(hf|api)_[A-Za-z0-9]{16,}$")


def looks_secret(name: str, value) -> bool:
    """A model_arg that carries a credential, by its name or by an HF-token-shaped value."""
    if name.endswith("_token_id"):
        return False
    return bool(_SECRET_NAME.search(name)) or bool(_SECRET_VALUE.match(str(value).strip()))


def unknown_message(name: str, value) -> str:
    close = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.6)
    shown = " (its value is not shown)" if looks_secret(name, value) else f"={value!r}"
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown model_arg {name}{shown}; {hint}accepted: {', '.join(NAMES)}"


def parse(given: dict) -> dict:
    """Every model_arg, typed, defaults filled in; raises ModelArgError naming the first bad one."""
    unknown = [k for k in given if k not in NAMES]
    if unknown:
        raise ModelArgError(unknown_message(unknown[0], given[unknown[0]]))
    out = {a.name: a.default for a in TABLE}
    for a in TABLE:
        if given.get(a.name) is not None:
            out[a.name] = a.convert(a.name, given[a.name])
    out["model"] = out["model"] or out["model_path"]
    del out["model_path"]
    if not out["model"]:
        raise ModelArgError("fast_dllm_v2 needs model=<hub id or folder> in --model_args "
                            "(model_path= is accepted too)")
    return out


def reuse_policy(args: dict):
    """The ReusePolicy the parsed args ask for (None without reuse), checked against the block cache."""
    from fastdllm_rt import PolicyError, ReusePolicy

    policy = ReusePolicy.from_args(args["reuse_k"], args["layer_subset"], args["reuse_mode"], args["subset_size"])
    if policy is not None and not args["use_block_cache"]:
        raise PolicyError(f"reuse_k={args['reuse_k']} needs use_block_cache=True in --model_args: layers are "
                          f"only skipped on sub-block steps, which exist only with the block cache")
    return policy


def help_text() -> str:
    import textwrap

    rows = [(a.name, "-" if a.default is None else str(a.default), a.help) for a in TABLE]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    indent = " " * (w0 + w1 + 6)
    lines = [f"  {'name':<{w0}}  {'default':<{w1}}  meaning"]
    for name, default, text in rows:
        lines.append(textwrap.fill(text, 112, initial_indent=f"  {name:<{w0}}  {default:<{w1}}  ",
                                   subsequent_indent=indent))
    return "\n".join(lines)
