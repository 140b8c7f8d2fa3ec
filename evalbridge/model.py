"""The lm-eval model ``fast_dllm_v2``, built on the fastdllm runtime.

Its model_args (names, defaults, meaning) are the table in ``model_args.py``; ``python -m evalbridge --help``
prints it. Scoring defaults to trajectory replay (docs/design.md, "Trajectory scoring"); ``scoring=first_token``
reproduces the original evaluation. Every request type is timed (``throughput.py``) and its runtime counters
accumulated for summary.json.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch
import lm_eval.models  # noqa: F401  - fills lm-eval's registry first: it imports its own models lazily only while
#                              the registry is empty, so registering ours first would hide "hf", "dummy", ...
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import fastdllm_rt

from . import distributed
from .model_args import ModelArgError, reuse_policy
from .model_args import parse as parse_model_args
from .throughput import Throughput

BOXED = "Please reason step by step, and put your final answer within \\boxed{{}}."
REWRITES = {"minerva_math": ("Solution:", BOXED), "gsm8k": ("Answer:", BOXED)}


@register_model("fast_dllm_v2")
class FastDLLMv2LM(LM):
    instances: list = []       # every model the harness built in this process (the launcher reads the last)

    def __init__(self, **model_args):
        """Keyword arguments are the model_args of ``model_args.TABLE``; an unknown name is an error."""
        super().__init__()
        args = parse_model_args(model_args)
        if args["token"]:
            os.environ["HF_TOKEN"] = args["token"]        # huggingface_hub reads it there; never stored here
        self.policy = reuse_policy(args)
        self.dist = distributed.setup()
        self._rank, self._world_size = self.dist.rank, self.dist.world_size
        device = args["device"] or (f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.rt = fastdllm_rt.load(args["model"], dtype=None if args["dtype"] == "auto" else args["dtype"],
                                   device=device, backend=args["backend"], revision=args["revision"],
                                   mask_token_id=args["mask_token_id"], stop_token_id=args["stop_token_id"],
                                   pad_token_id=args["pad_token_id"], prefix_cache=args["prefix_cache"],
                                   prefix_cache_bytes=args["prefix_cache_bytes"])
        self.tokenizer = self.rt.require_tokenizer("lm-eval tasks")
        self._device = self.rt.device
        if args["bd_size"] != self.rt.config.bd_size:
            raise ModelArgError(f"bd_size={args['bd_size']} but the checkpoint was trained with "
                                f"{self.rt.config.bd_size}; drop bd_size or set it to {self.rt.config.bd_size}")
        if self.policy is not None:
            self.policy.resolve(self.rt.config.num_hidden_layers)
        self.batch_size = None if args["batch_size"] == "auto" else args["batch_size"]
        self.max_new_tokens = args["max_new_tokens"]
        self.threshold = args["threshold"]
        self.small_block_size = args["small_block_size"]
        self.use_block_cache = args["use_block_cache"]
        self.scoring, self.reveal = args["scoring"], args["reveal"]
        self.prompt_rewrite, self.early_exit = args["prompt_rewrite"], args["early_exit"]
        self._max_length = args["max_length"]
        # names lm-eval passes that this model does not use (they are accepted, and reported)
        self.unused_args = sorted(k for k in ("max_batch_size", "trust_remote_code") if model_args.get(k))
        self.model_args = dict(
            model=args["model"], dtype=str(self.rt.dtype).replace("torch.", ""), device=str(self.rt.device),
            backend=self.rt.backend, batch_size=args["batch_size"], max_new_tokens=self.max_new_tokens,
            threshold=self.threshold, bd_size=args["bd_size"], small_block_size=self.small_block_size,
            use_block_cache=self.use_block_cache, reuse_k=args["reuse_k"], layer_subset=args["layer_subset"],
            reuse_mode=args["reuse_mode"], subset_size=args["subset_size"], scoring=self.scoring,
            reveal=self.reveal, prompt_rewrite=self.prompt_rewrite, early_exit=self.early_exit,
            prefix_cache=args["prefix_cache"], prefix_cache_bytes=args["prefix_cache_bytes"])
        self.throughput = Throughput(self.rt.device, self.rt.config.num_hidden_layers)
        FastDLLMv2LM.instances.append(self)

    # ---- lm-eval plumbing --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.rt.token_ids.stop

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length or (self.rt.config.max_position_embeddings - 2 * self.rt.config.bd_size)

    @property
    def tokenizer_name(self) -> str:
        return self.rt.folder.replace("/", "__")

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def all_gather(self, tensor):
        return self.dist.all_gather(tensor)

    def gather_object(self, obj, dst=0):
        return self.dist.gather_object(obj, dst)

    def barrier(self):
        self.dist.barrier()

    def _encode_pair(self, context: str, continuation: str):
        """As lm-eval's HF model: trailing spaces move from the context to the continuation, the pair is
        tokenised jointly and split at the context's length (so is the original adapter)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        ctx_len = len(ctx)
        if whole[:ctx_len] != ctx:                      # the joint tokenisation merged across the boundary
            return ctx, self.tokenizer.encode(continuation)
        return whole[:ctx_len], whole[ctx_len:]

    def _score_kwargs(self):
        return dict(scoring=self.scoring, use_block_cache=self.use_block_cache, threshold=self.threshold,
                    reuse=self.policy if self.scoring == "trajectory" else None, reveal=self.reveal,
                    small_block_size=self.small_block_size, batch_size=self.batch_size)

    # ---- request types -----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx, cont = [self.prefix_token_id], self.tokenizer.encode(continuation)
            else:
                ctx, cont = self._encode_pair(context, continuation)
            pairs.append((ctx, cont))
        if not pairs:
            return []
        with self.throughput.timing("loglikelihood") as t:
            res = self.rt.score(pairs, **self._score_kwargs())
            t.add(res.stats)
        out = list(zip(res.loglikelihoods, res.is_greedy))
        for req, ans in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if not requests:
            return []
        docs = [self.tokenizer.encode(req.args[0]) for req in requests]
        with self.throughput.timing("loglikelihood_rolling") as t:
            totals, stats = self.rt.score_rolling(docs, prefix_token_id=self.prefix_token_id,
                                                  max_length=self.max_length, **self._score_kwargs())
            t.add(stats)
        for req, ans in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ans)
        return totals

    def _rewrite(self, context: str, task_name: str | None) -> str:
        if not self.prompt_rewrite or not task_name:
            return context
        for prefix, (old, new) in REWRITES.items():
            if task_name.startswith(prefix):
                return context.replace(old, new)
        return context

    def generate_until(self, requests, disable_tqdm: bool = False):
        groups = defaultdict(list)                      # same generation settings -> one runtime call
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(kw.pop("max_gen_toks", self.max_new_tokens))
            do_sample = str(kw.pop("do_sample", False)).strip().lower() in ("1", "true", "yes", "on")
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            top_p = float(kw.pop("top_p", 1.0))
            key = (tuple(until), max_toks, temperature, top_p)
            prompt = self._rewrite(context, getattr(req, "task_name", None))
            groups[key].append((n, self.tokenizer.encode(prompt)))
        out = [None] * len(requests)
        for (until, max_toks, temperature, top_p), items in groups.items():
            with self.throughput.timing("generate_until") as t:
                res = self.rt.generate([ids for _, ids in items], max_new_tokens=max_toks, threshold=self.threshold,
                                       block_size=self.rt.config.bd_size, small_block_size=self.small_block_size,
                                       use_block_cache=self.use_block_cache, temperature=temperature, top_p=top_p,
                                       reuse=self.policy, stop_strings=list(until), early_exit=self.early_exit,
                                       batch_size=self.batch_size)
                t.add(res.stats)
            for (n, _), text in zip(items, res.texts):
                out[n] = text
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    # ---- for the launcher --------------------------------------------------------------------------------
    def run_report(self) -> dict:
        """This rank's counters and timings (the launcher combines ranks)."""
        return {"rank": self.rank, "throughput": self.throughput.to_dict(), "model_args": self.model_args,
                "reuse": None if self.policy is None else self.policy.describe(self.rt.config.num_hidden_layers),
                "runtime": self.rt.describe(), "ignored_model_args": self.unused_args,
                "world_size": self.world_size}
