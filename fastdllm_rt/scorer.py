"""Log-likelihood scoring of a call's requests: chunking, out-of-memory back-off, rolling windows.

The scoring procedures themselves (trajectory replay, first-token) run over one chunk at a time
(``scoring.py``). Requests sharing a context stay in one chunk, so their shared prefill is computed once; a
chunk that does not fit in GPU memory is retried in halves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .cache import Caches
from .config import ScoreConfig
from .decoding import StepPlanner
from .prefill import Prefiller
from .prefix_cache import Lease
from .scoring import FirstTokenScorer, ScoreChunk, TrajectoryScorer
from .stats import CallStats

log = logging.getLogger("fastdllm_rt")

BACKED_OFF = "scoring batch backed off"
NOTHING_SKIPPED = ("no layer evaluation was skipped: every revealed token was predicted by a prefill, commit or "
                   "full-block forward (step 0 of its sub-block), which always compute every layer "
                   "(docs/design.md, Trajectory scoring)")


@dataclass
class ScoreResult:
    loglikelihoods: list
    is_greedy: list
    stats: object


class Scorer:
    def __init__(self, runtime, config: ScoreConfig, plan=None):
        """``plan``: the call's resolved ``ReusePlan`` (None: compute every layer)."""
        self.rt, self.cfg, self.plan = runtime, config, plan
        self.num_layers = runtime.config.num_hidden_layers

    def score(self, requests) -> ScoreResult:
        stats = CallStats(num_layers=self.num_layers, requests=len(requests))
        ll = [0.0] * len(requests)
        greedy = [True] * len(requests)
        if not requests:
            return ScoreResult(ll, greedy, stats)
        for ids in self._chunks(requests):
            self._score_backing_off(requests, ids, ll, greedy, stats)
        if self.plan is not None and stats.skipped_layer_evaluations == 0:
            stats.notes.append(NOTHING_SKIPPED)
        return ScoreResult(ll, greedy, stats)

    def score_rolling(self, documents, prefix_token: int, max_length: int):
        """Whole-document log-likelihoods over disjoint windows (``rolling_windows``); returns (totals, stats)."""
        windows, owner = [], []
        for d, doc in enumerate(documents):
            for ctx, cont in rolling_windows(list(doc), prefix_token, max_length):
                windows.append((ctx, cont))
                owner.append(d)
        res = self.score(windows)
        totals = [0.0] * len(documents)
        for d, value in zip(owner, res.loglikelihoods):
            totals[d] += value
        res.stats.requests = len(documents)
        return totals, res.stats

    def _chunks(self, requests):
        """Request index lists, contexts kept together, each at most ``batch_size`` requests."""
        size = self.cfg.batch_size or self._auto_batch(requests)
        groups: dict = {}
        for i, (c, _) in enumerate(requests):
            groups.setdefault(tuple(c), []).append(i)
        order = list(groups)
        if self.rt.prefix_cache is not None:
            order.sort()                    # contexts sharing a header run together (results stay in order)
        chunk: list[int] = []
        for members in (groups[c] for c in order):
            if chunk and len(chunk) + len(members) > size:
                yield chunk
                chunk = []
            chunk.extend(members)
        if chunk:
            yield chunk

    def _auto_batch(self, requests) -> int:
        device = self.rt.device
        if device.type != "cuda":
            return 64
        max_len = max(len(c) + len(x) for c, x in requests) + 2 * self.cfg.block_size
        reuse_layers = len(self.plan.layers) if self.plan is not None else 0
        per_slot = Caches.bytes_per_slot(self.rt.config, max_len, self.rt.dtype, reuse_layers)
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, min(512, int(0.5 * free // max(per_slot, 1))))

    def _score_backing_off(self, requests, ids, ll, greedy, stats):
        try:
            self._score_chunk(requests, ids, ll, greedy, stats)
            return
        except torch.cuda.OutOfMemoryError:
            if len(ids) == 1:
                raise
        # outside the except block: the failed attempt's frames (and their tensors) are gone now
        self.rt.release_caches()
        cache = self.rt.prefix_cache
        if cache is not None and cache.bytes:
            freed = cache.shrink()              # the prefix cache gives way before any batch is halved
            stats.notes.append(f"prefix cache shrank by {freed} bytes after running out of GPU memory")
            self._score_backing_off(requests, ids, ll, greedy, stats)
            return
        half = len(ids) // 2
        if not any(n.startswith(BACKED_OFF) for n in stats.notes):     # once per call
            log.warning("scoring %d requests at once did not fit in GPU memory; retrying in smaller chunks "
                        "(%d, then smaller if needed)", len(ids), half)
            stats.notes.append(f"{BACKED_OFF} from {len(ids)} requests after running out of GPU memory")
        self._score_backing_off(requests, ids[:half], ll, greedy, stats)
        self._score_backing_off(requests, ids[half:], ll, greedy, stats)

    def _score_chunk(self, requests, ids, ll, greedy, stats):
        cfg, ids_tok = self.cfg, self.rt.token_ids
        sub = [requests[i] for i in ids]
        chunk = ScoreChunk(sub, [0.0] * len(sub), [True] * len(sub))
        max_len = max(len(c) + len(x) for c, x in sub) + 2 * cfg.block_size
        caches, runner = self.rt.pool.start_call(len(sub) + 1, max_len, self.plan,
                                                 CallStats(num_layers=self.num_layers))
        cache = self.rt.prefix_cache
        with Lease(cache) as lease:
            prefiller = Prefiller(runner, caches, cache, lease) if cache is not None else None
            if cfg.scoring == "trajectory":
                planner = StepPlanner(ids_tok.mask, block_size=cfg.block_size, sub_block_size=cfg.sub_block_size,
                                      use_block_cache=cfg.use_block_cache, plan=self.plan)
                TrajectoryScorer(runner, planner, caches, reveal=cfg.reveal, threshold=cfg.threshold,
                                 prefiller=prefiller).run(chunk)
            else:
                FirstTokenScorer(runner, caches, mask_id=ids_tok.mask, stop_id=ids_tok.stop,
                                 block_size=cfg.block_size, prefiller=prefiller).run(chunk)
        part = runner.finish()
        part.prefix_evictions = lease.evictions
        part.requests = 0
        part.continuation_tokens_scored = chunk.tokens_scored
        stats.merge(part)
        for k, i in enumerate(ids):
            ll[i] = chunk.ll[k]
            greedy[i] = chunk.greedy[k]


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
