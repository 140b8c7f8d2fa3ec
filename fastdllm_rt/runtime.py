"""The object ``fastdllm_rt.load`` returns: a loaded model with ``generate``, ``score`` and ``score_rolling``.

Every call validates its inputs and reuse policy before any model work, and returns its counters.
"""
from __future__ import annotations

import gc
import logging

import torch

from .cache import Caches
from .config import TokenIds
from .engine import Engine
from .errors import ConfigError, InputError, PolicyError
from .reuse import ReusePolicy, ReuseRuntime
from .sampler import GenerationResult, Sampler
from .scorer import REVEAL_MODES, SCORING_MODES, FirstTokenScorer, ScoreResult, TrajectoryScorer, _Chunk
from .stats import CallStats

log = logging.getLogger("fastdllm_rt")


class Runtime:
    def __init__(self, model, *, tokenizer, token_ids: TokenIds, folder: str, backend: str):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.folder = folder
        self.backend = backend
        self._caches: Caches | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def describe(self) -> dict:
        cfg = self.config
        return {"folder": self.folder, "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                "hidden_size": cfg.hidden_size, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "backend": self.backend, "mask_token_id": self.token_ids.mask,
                "stop_token_id": self.token_ids.stop, "pad_token_id": self.token_ids.pad}

    # ---- helpers used by the sampler and scorer ----------------------------------------------------------
    def new_caches(self, num_slots: int, max_len: int, policy: ReusePolicy | None) -> Caches:
        """Caches for a call. The last caches are kept and reused when they are large enough (same reuse
        layers), so their allocation and their captured CUDA graphs carry over between calls."""
        layers = policy.resolve(self.config.num_hidden_layers) if policy is not None else ()
        mode = policy.mode if policy is not None else None
        if self._caches is not None and self._caches.fits(num_slots, max_len, layers, mode):
            self._caches.reset()
            return self._caches
        self.release_caches()
        self._caches = Caches(self.config, num_slots, max_len, self.dtype, self.device, reuse_layers=layers,
                              reuse_mode=mode)
        return self._caches

    def release_caches(self) -> None:
        """Free the pooled caches and their CUDA graphs (before allocating larger ones, or to give memory back)."""
        if self._caches is not None:
            self._caches.close()
            self._caches = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reuse_runtime(self, policy: ReusePolicy | None, caches: Caches):
        if policy is None or not policy.active:
            return None
        return ReuseRuntime(policy, self.config.num_hidden_layers, caches)

    def require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ConfigError(f"{what} need a tokenizer, and {self.folder} has no tokenizer.json")
        return self.tokenizer

    def _check_policy(self, reuse, use_block_cache: bool) -> ReusePolicy | None:
        if reuse is None:
            return None
        if not isinstance(reuse, ReusePolicy):
            raise PolicyError(f"reuse must be a fastdllm_rt.ReusePolicy or None, got {type(reuse).__name__}")
        reuse.resolve(self.config.num_hidden_layers)
        if reuse.active and not use_block_cache:
            raise PolicyError(f"reuse with k={reuse.k} needs use_block_cache=True: layers are only skipped on "
                              f"sub-block steps, which exist only with the block cache (contract §2)")
        return reuse if reuse.active else None

    def _check_tokens(self, seqs, what: str, allow_empty: bool = False) -> None:
        V = self.config.vocab_size
        for n, seq in enumerate(seqs):
            if not allow_empty and len(seq) == 0:
                raise InputError(f"{what} {n} is empty; every {what} needs at least one token")
            bad = [t for t in seq if not (isinstance(t, int) and 0 <= t < V)]
            if bad:
                raise InputError(f"{what} {n} holds token ids outside the vocabulary 0..{V - 1}: {bad[:5]}; "
                                 f"tokenize with this checkpoint's tokenizer")

    def _check_blocks(self, block_size: int, small_block_size: int) -> None:
        if block_size != self.config.bd_size:
            raise ConfigError(f"block_size={block_size} differs from the checkpoint's bd_size="
                              f"{self.config.bd_size}; decode with the training block size")
        if small_block_size < 1 or block_size % small_block_size:
            raise ConfigError(f"small_block_size={small_block_size} must divide block_size={block_size}")

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, *, max_new_tokens, threshold=0.9, block_size=32, small_block_size=8,
                 use_block_cache=True, temperature=0.0, top_p=1.0, reuse=None, stop_strings=None,
                 early_exit=False, seed=0, batch_size=None, trace=None) -> GenerationResult:
        """Block-diffusion generation for token-id prompts. See ``sampler.py`` for the algorithm.

        ``early_exit``: leave a block as soon as every token that will be returned is decoded (same tokens,
        fewer forwards); off by default to keep the original's forward accounting. ``batch_size``: rows in
        flight at once (default all); finished rows hand their slot to waiting prompts. ``trace``: called as
        ``trace(row, kind, block_start, sub_block, step, logits)`` after every denoising forward (analysis and
        tests; logits are the sub-block's shifted fp32 logits)."""
        prompts = [list(p) for p in prompts]
        if not prompts:
            return GenerationResult([], [], [], CallStats(num_layers=self.config.num_hidden_layers))
        self._check_tokens(prompts, "prompt")
        self._check_blocks(block_size, small_block_size)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"threshold must lie in [0, 1], got {threshold}")
        longest = max(len(p) for p in prompts) + max_new_tokens + 2 * block_size
        if longest > self.config.max_position_embeddings:
            raise InputError(f"a prompt of {max(len(p) for p in prompts)} tokens plus max_new_tokens="
                             f"{max_new_tokens} exceeds the model's {self.config.max_position_embeddings} "
                             f"positions; shorten the prompt or lower max_new_tokens")
        if stop_strings:
            self.require_tokenizer("stop strings")
        policy = self._check_policy(reuse, use_block_cache)
        sampler = Sampler(self, max_new_tokens=max_new_tokens, threshold=float(threshold), block_size=block_size,
                          small_block_size=small_block_size, use_block_cache=use_block_cache,
                          temperature=temperature, top_p=top_p, reuse=policy, stop_strings=stop_strings,
                          early_exit=early_exit, seed=seed, batch_size=batch_size, trace=trace)
        result = sampler.run(prompts)
        if policy is not None and policy.active and result.stats.skipped_layer_evaluations == 0:
            result.stats.notes.append(
                "no layer evaluation was skipped: every sub-block was finished by its first step, a full-block "
                "forward that computes every layer; reuse acts only on later steps of a sub-block (a higher "
                "threshold, e.g. 1.0, makes more of them)")
        return result

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests, *, scoring="trajectory", use_block_cache=True, threshold=0.9, reuse=None,
              reveal="one", small_block_size=8, batch_size=None) -> ScoreResult:
        """Log-likelihood of each ``(context, continuation)``; results in request order.

        ``batch_size``: requests per chunk (default: as many as memory allows); a chunk that does not fit is
        retried at half the size, with one log line."""
        requests = [(list(c), list(x)) for c, x in requests]
        if scoring not in SCORING_MODES:
            raise ConfigError(f"scoring={scoring!r} is unknown; choose one of {SCORING_MODES}")
        if reveal not in REVEAL_MODES:
            raise ConfigError(f"reveal={reveal!r} is unknown; choose one of {REVEAL_MODES}")
        self._check_blocks(self.config.bd_size, small_block_size)
        self._check_tokens([c for c, _ in requests], "context")
        self._check_tokens([x for _, x in requests], "continuation")
        limit = self.config.max_position_embeddings
        for n, (c, x) in enumerate(requests):
            if len(c) + len(x) + 2 * self.config.bd_size > limit:
                raise InputError(f"request {n} has {len(c) + len(x)} tokens, more than the model's {limit} "
                                 f"positions allow; truncate the context")
        policy = self._check_policy(reuse, use_block_cache) if scoring == "trajectory" else None
        if scoring == "first_token" and reuse is not None and reuse.active:
            raise PolicyError("first_token scoring is one plain forward with no denoising steps, so a reuse "
                              "policy cannot act on it; use scoring='trajectory' to study reuse")
        stats = CallStats(num_layers=self.config.num_hidden_layers, requests=len(requests))
        ll = [0.0] * len(requests)
        greedy = [True] * len(requests)
        if not requests:
            return ScoreResult(ll, greedy, stats)
        for chunk_ids in self._chunks(requests, batch_size, policy):
            self._score_chunk(requests, chunk_ids, ll, greedy, stats, scoring=scoring, policy=policy,
                              use_block_cache=use_block_cache, threshold=float(threshold), reveal=reveal,
                              sub_size=small_block_size)
        if policy is not None and stats.skipped_layer_evaluations == 0:
            stats.notes.append("no layer evaluation was skipped: every revealed token was predicted by a "
                               "prefill, commit or full-block forward (step 0 of its sub-block), which always "
                               "compute every layer (contract §4.4)")
        return ScoreResult(ll, greedy, stats)

    def _chunks(self, requests, batch_size, policy):
        """Request index lists, contexts kept together, each at most ``batch_size`` requests."""
        size = batch_size or self._auto_batch(requests, policy)
        groups: dict = {}
        for i, (c, _) in enumerate(requests):
            groups.setdefault(tuple(c), []).append(i)
        chunk: list[int] = []
        for members in groups.values():
            if chunk and len(chunk) + len(members) > size:
                yield chunk
                chunk = []
            chunk.extend(members)
        if chunk:
            yield chunk

    def _auto_batch(self, requests, policy) -> int:
        if self.device.type != "cuda":
            return 64
        max_len = max(len(c) + len(x) for c, x in requests) + 2 * self.config.bd_size
        per_slot = Caches.bytes_per_slot(self.config, max_len, self.dtype,
                                         len(policy.resolve(self.config.num_hidden_layers)) if policy else 0)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(512, int(0.5 * free // max(per_slot, 1))))

    def _score_chunk(self, requests, ids, ll, greedy, stats, **kw):
        try:
            self._score_ids(requests, ids, ll, greedy, stats, **kw)
            return
        except torch.cuda.OutOfMemoryError:
            if len(ids) == 1:
                raise
        # outside the except block: the failed attempt's frames (and their tensors) are gone now
        self.release_caches()
        half = len(ids) // 2
        if not any(n.startswith("scoring batch backed off") for n in stats.notes):     # once per call
            log.warning("scoring %d requests at once did not fit in GPU memory; retrying in smaller chunks "
                        "(%d, then smaller if needed)", len(ids), half)
            stats.notes.append(f"scoring batch backed off from {len(ids)} requests after running out of GPU memory")
        self._score_chunk(requests, ids[:half], ll, greedy, stats, **kw)
        self._score_chunk(requests, ids[half:], ll, greedy, stats, **kw)

    def _score_ids(self, requests, ids, ll, greedy, stats, *, scoring, policy, use_block_cache, threshold, reveal,
                   sub_size):
        sub = [requests[i] for i in ids]
        chunk = _Chunk(sub, [0.0] * len(sub), [True] * len(sub))
        bs = self.config.bd_size
        max_len = max(len(c) + len(x) for c, x in sub) + 2 * bs
        caches = self.new_caches(len(sub) + 1, max_len, policy)
        engine = Engine(self.model, caches, self.token_ids.mask, use_block_cache=use_block_cache, sub_size=sub_size,
                        reuse=self.reuse_runtime(policy, caches),
                        stats=CallStats(num_layers=self.config.num_hidden_layers))
        if scoring == "trajectory":
            TrajectoryScorer(engine, caches, mask_id=self.token_ids.mask, block_size=bs, sub_size=sub_size,
                             reveal=reveal, threshold=threshold).run(chunk)
        else:
            FirstTokenScorer(engine, caches, mask_id=self.token_ids.mask, stop_id=self.token_ids.stop,
                             block_size=bs).run(chunk)
        part = engine.finish()
        part.requests = 0
        part.continuation_tokens_scored = chunk.tokens_scored
        stats.merge(part)
        for k, i in enumerate(ids):
            ll[i] = chunk.ll[k]
            greedy[i] = chunk.greedy[k]

    @torch.inference_mode()
    def score_rolling(self, documents, *, prefix_token_id=None, max_length=None, **score_kwargs):
        """Log-likelihood of whole documents for perplexity (lm-eval's ``loglikelihood_rolling``): the document
        is cut into windows of at most ``max_length`` tokens, each token predicted exactly once, the first one
        conditioned on ``prefix_token_id`` (default: the stop token). Returns (list of floats, stats)."""
        prefix = self.token_ids.stop if prefix_token_id is None else int(prefix_token_id)
        max_length = max_length or (self.config.max_position_embeddings - 2 * self.config.bd_size)
        windows, owner = [], []
        for d, doc in enumerate(documents):
            for ctx, cont in rolling_windows(list(doc), prefix, max_length):
                windows.append((ctx, cont))
                owner.append(d)
        res = self.score(windows, **score_kwargs)
        totals = [0.0] * len(documents)
        for d, value in zip(owner, res.loglikelihoods):
            totals[d] += value
        res.stats.requests = len(documents)
        return totals, res.stats


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int):
    """Disjoint (context, continuation) windows covering ``tokens`` (lm-eval's rolling-window rule with
    context length 1): every token is predicted once, with as much context as fits in ``max_len``."""
    if not tokens:
        return []
    out = []
    first = min(max_len, len(tokens))
    out.append(([prefix_token], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx = tokens[max(end - max_len - 1, 0):end - 1]
        out.append((ctx[:len(ctx) - (n - 1)], tokens[end - n:end]))
        done = end
    return out
