"""The object ``fastdllm_rt.load`` returns: a loaded model with ``generate``, ``score`` and ``score_rolling``.

Each call checks its inputs, builds its configuration (``DecodeConfig`` / ``ScoreConfig``) and resolves its
reuse policy once, before any model work, then hands over to the sampler or the scorer. Counters come back
with every result.
"""
from __future__ import annotations

import torch

from .config import DecodeConfig, ScoreConfig, TokenIds
from .errors import ConfigError, InputError
from .pool import CachePool
from .prefix_cache import PrefixCache
from .reuse import resolve_policy
from .sampler import GenerationResult, Sampler
from .scorer import ScoreResult, Scorer
from .stats import CallStats

NOTHING_SKIPPED = ("no layer evaluation was skipped: every sub-block was finished by its first step, a full-block "
                   "forward that computes every layer; reuse acts only on later steps of a sub-block (a higher "
                   "threshold, e.g. 1.0, makes more of them)")


def _options(options: dict) -> dict:
    """The public keyword ``small_block_size`` is the sub-block size."""
    if "small_block_size" in options:
        if "sub_block_size" in options:
            raise ConfigError("pass small_block_size or sub_block_size, not both (they name the same setting)")
        options["sub_block_size"] = options.pop("small_block_size")
    return options


class Runtime:
    def __init__(self, model, *, tokenizer, token_ids: TokenIds, folder: str, backend: str, prefix_cache=True,
                 prefix_cache_bytes=None):
        """``prefix_cache``: share whole context blocks' K/V across requests and calls (docs/design.md, Prefix
        cache); ``prefix_cache_bytes``: its budget (default: 15 % of the free memory when first used)."""
        self.model = model
        self.config = model.config
        self.block_size = model.block_size
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.folder = folder
        self.backend = backend
        self.pool = CachePool(model)
        self.prefix_cache = PrefixCache(self.block_size, prefix_cache_bytes, model.device) if prefix_cache else None

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

    def release_caches(self) -> None:
        """Free the pooled caches and their CUDA graphs (to give memory back); the prefix cache stays."""
        self.pool.release()

    def require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ConfigError(f"{what} need a tokenizer, and {self.folder} has no tokenizer.json")
        return self.tokenizer

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, *, trace=None, **options) -> GenerationResult:
        """Block-diffusion generation for token-id prompts; ``options`` are ``DecodeConfig``'s fields
        (``max_new_tokens`` required; ``small_block_size`` names ``sub_block_size``). See ``sampler.py``.

        ``trace``: called as ``trace(row, kind, block_start, sub_block, step, logits)`` after every denoising
        forward (analysis and tests; logits are the sub-block's shifted fp32 logits)."""
        config = DecodeConfig(**_options(options))
        prompts = [list(p) for p in prompts]
        if not prompts:
            return GenerationResult([], [], [], CallStats(num_layers=self.config.num_hidden_layers))
        self._check_tokens(prompts, "prompt")
        self._check_block_size(config.block_size)
        longest = max(len(p) for p in prompts)
        if longest + config.max_new_tokens + 2 * self.block_size > self.config.max_position_embeddings:
            raise InputError(f"a prompt of {longest} tokens plus max_new_tokens={config.max_new_tokens} exceeds "
                             f"the model's {self.config.max_position_embeddings} positions; shorten the prompt or "
                             f"lower max_new_tokens")
        if config.stop_strings:
            self.require_tokenizer("stop strings")
        plan = resolve_policy(config.reuse, self.config.num_hidden_layers, config.use_block_cache)
        result = Sampler(self, config, plan, trace).run(prompts)
        if plan is not None and result.stats.skipped_layer_evaluations == 0:
            result.stats.notes.append(NOTHING_SKIPPED)
        return result

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests, **options) -> ScoreResult:
        """Log-likelihood of each ``(context, continuation)``; results in request order. ``options`` are
        ``ScoreConfig``'s fields (``small_block_size`` names ``sub_block_size``).

        ``batch_size``: requests per chunk (default: as many as memory allows); a chunk that does not fit is
        retried at half the size, with one log line."""
        config = self._score_config(options)
        requests = [(list(c), list(x)) for c, x in requests]
        self._check_requests(requests)
        return Scorer(self, config, self._score_plan(config)).score(requests)

    @torch.inference_mode()
    def score_rolling(self, documents, *, prefix_token_id=None, max_length=None, **options):
        """Log-likelihood of whole documents for perplexity (lm-eval's ``loglikelihood_rolling``): the document
        is cut into windows of at most ``max_length`` tokens, each token predicted exactly once, the first one
        conditioned on ``prefix_token_id`` (default: the stop token). Returns (list of floats, stats)."""
        config = self._score_config(options)
        prefix = self.token_ids.stop if prefix_token_id is None else int(prefix_token_id)
        max_length = max_length or (self.config.max_position_embeddings - 2 * self.block_size)
        documents = [list(d) for d in documents]
        self._check_tokens(documents, "document", allow_empty=True)
        return Scorer(self, config, self._score_plan(config)).score_rolling(documents, prefix, max_length)

    # ---- checks ------------------------------------------------------------------------------------------
    def _score_config(self, options: dict) -> ScoreConfig:
        options = _options(options)
        self._check_block_size(options.setdefault("block_size", self.block_size))
        return ScoreConfig(**options)

    def _score_plan(self, config: ScoreConfig):
        if config.scoring != "trajectory":
            return None
        return resolve_policy(config.reuse, self.config.num_hidden_layers, config.use_block_cache)

    def _check_requests(self, requests) -> None:
        self._check_tokens([c for c, _ in requests], "context")
        self._check_tokens([x for _, x in requests], "continuation")
        limit = self.config.max_position_embeddings
        for n, (c, x) in enumerate(requests):
            if len(c) + len(x) + 2 * self.block_size > limit:
                raise InputError(f"request {n} has {len(c) + len(x)} tokens, more than the model's {limit} "
                                 f"positions allow; truncate the context")

    def _check_tokens(self, seqs, what: str, allow_empty: bool = False) -> None:
        V = self.config.vocab_size
        for n, seq in enumerate(seqs):
            if not allow_empty and len(seq) == 0:
                raise InputError(f"{what} {n} is empty; every {what} needs at least one token")
            bad = [t for t in seq if not (isinstance(t, int) and 0 <= t < V)]
            if bad:
                raise InputError(f"{what} {n} holds token ids outside the vocabulary 0..{V - 1}: {bad[:5]}; "
                                 f"tokenize with this checkpoint's tokenizer")

    def _check_block_size(self, block_size: int) -> None:
        if block_size != self.block_size:
            raise ConfigError(f"block_size={block_size} differs from the checkpoint's bd_size="
                              f"{self.block_size}; decode with the training block size")
