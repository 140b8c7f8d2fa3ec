"""The lm-eval model ``fast_dllm_v2``, built on the fastdllm runtime.

model_args keep the original adapter's names (``model``/``model_path``, ``dtype``, ``device``, ``batch_size``,
``max_new_tokens``, ``threshold``, ``bd_size``, ``small_block_size``, ``use_block_cache``, ``reuse_k``,
``layer_subset``) and add ``reuse_mode``, ``scoring``, ``subset_size``, ``prompt_rewrite``, ``backend``,
``early_exit``, ``reveal``, ``mask_token_id``/``stop_token_id``/``pad_token_id``. Defaults follow the
original adapter (block cache off, threshold 0.9, block 32, sub-block 8, 2048 new tokens) so published numbers
stay comparable; scoring defaults to trajectory replay (contract §4), ``scoring=first_token`` reproduces the
original evaluation.

Every request type is timed (``throughput.py``) and its runtime counters accumulated for summary.json.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import lm_eval.models  # noqa: F401  - fills lm-eval's registry first: it imports its own models lazily only while
#                              the registry is empty, so registering ours first would hide "hf", "dummy", ...
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import fastdllm_rt
from fastdllm_rt import ReusePolicy

from . import distributed
from .throughput import Throughput

BOXED = "Please reason step by step, and put your final answer within \\boxed{{}}."
REWRITES = {"minerva_math": ("Solution:", BOXED), "gsm8k": ("Answer:", BOXED)}


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("fast_dllm_v2")
class FastDLLMv2LM(LM):
    instances: list = []       # every model the harness built in this process (the launcher reads the last)

    def __init__(self, model: str | None = None, model_path: str | None = None, dtype="auto", device=None,
                 batch_size=32, max_new_tokens=2048, threshold=0.9, bd_size=32, small_block_size=8,
                 use_block_cache=False, reuse_k=1, layer_subset="first", reuse_mode="output", subset_size=12,
                 scoring="trajectory", reveal="one", prompt_rewrite=True, backend=None, early_exit=False,
                 mask_token_id=None, stop_token_id=None, pad_token_id=None, max_length=None, **unused):
        super().__init__()
        path = model or model_path
        if path is None:
            raise ValueError("fast_dllm_v2 needs model=<hub id or folder> in --model_args "
                             "(model_path= is accepted too)")
        self.dist = distributed.setup()
        self._rank, self._world_size = self.dist.rank, self.dist.world_size
        if device is None or device == "auto":
            device = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        self.rt = fastdllm_rt.load(path, dtype=None if dtype == "auto" else dtype, device=device, backend=backend,
                                   mask_token_id=mask_token_id, stop_token_id=stop_token_id,
                                   pad_token_id=pad_token_id)
        self.tokenizer = self.rt.require_tokenizer("lm-eval tasks")
        self._device = self.rt.device
        self.batch_size = None if str(batch_size).startswith("auto") else int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.threshold = float(threshold)
        if int(bd_size) != self.rt.config.bd_size:
            raise ValueError(f"bd_size={bd_size} but the checkpoint was trained with {self.rt.config.bd_size}")
        self.small_block_size = int(small_block_size)
        self.use_block_cache = _bool(use_block_cache)
        self.policy = ReusePolicy.from_args(reuse_k, layer_subset, reuse_mode, subset_size)
        if self.policy is not None:
            self.policy.resolve(self.rt.config.num_hidden_layers)
            if not self.use_block_cache:
                raise ValueError(f"reuse_k={reuse_k} needs use_block_cache=True in --model_args: layers are only "
                                 f"skipped on sub-block steps, which exist only with the block cache")
        self.scoring = scoring
        self.reveal = reveal
        self.prompt_rewrite = _bool(prompt_rewrite)
        self.early_exit = _bool(early_exit)
        self._max_length = int(max_length) if max_length else None
        self.unused_args = sorted(unused)
        self.model_args = {k: v for k, v in dict(
            model=path, dtype=str(self.rt.dtype).replace("torch.", ""), device=str(self.rt.device),
            backend=self.rt.backend, batch_size=batch_size, max_new_tokens=self.max_new_tokens,
            threshold=self.threshold, bd_size=int(bd_size), small_block_size=self.small_block_size,
            use_block_cache=self.use_block_cache, reuse_k=int(reuse_k), layer_subset=layer_subset,
            reuse_mode=reuse_mode, subset_size=int(subset_size), scoring=scoring, reveal=reveal,
            prompt_rewrite=self.prompt_rewrite, early_exit=self.early_exit).items()}
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
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tokenizer.encode(text)
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((list(ctx), list(cont)))
                owner.append(n)
        totals = [0.0] * len(requests)
        if windows:
            with self.throughput.timing("loglikelihood_rolling") as t:
                res = self.rt.score(windows, **self._score_kwargs())
                res.stats.requests = len(requests)
                t.add(res.stats)
            for n, ll in zip(owner, res.loglikelihoods):
                totals[n] += ll
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
            do_sample = _bool(kw.pop("do_sample", False))
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
