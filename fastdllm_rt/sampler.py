"""Block-diffusion generation: the original ``batch_sample`` with its defects fixed (docs/design.md, Sampling).

Per step, every row with masks in its current sub-block unmasks each masked position whose confidence is
strictly above the threshold, plus always its single most confident one. Rows keep their own block, sub-block
and step counters, so a row in a batch takes the steps it would take alone; finished rows leave and waiting
prompts take their cache slots (continuous batching).

Fixed defects, each with a regression test in tests/rt/test_sampler_defects.py:
* a prompt of exactly 32 tokens is prefilled and used (the original ignored it);
* every row's first token is predicted from its own prompt (no batched off-by-one);
* temperature > 0 samples each row from its own distribution (the original used row 0's samples for all);
* stop strings end a generation; returned tokens never contain padding.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .batch import Kind, RowRequest
from .config import DecodeConfig
from .decoding import BlockState, StepPlanner
from .choice import greedy_choice as _greedy_choice, sample_top_p as _sample_top_p
from .prefill import Prefiller, PrefillJob
from .prefix_cache import Lease
from .stats import CallStats


@dataclass
class GenerationResult:
    tokens: list            # per prompt: generated ids, ending with the stop token when one was produced
    finish_reasons: list    # "stop_token" | "stop_string" | "length"
    texts: list | None      # decoded text cut at the first stop string (when a tokenizer is available)
    stats: CallStats


class _Row:
    __slots__ = ("index", "prompt", "budget", "temperature", "top_p", "generator", "state", "gen", "phase",
                 "finish_reason", "stop_cut")

    def __init__(self, index, prompt, budget, temperature, top_p, generator):
        self.index, self.prompt, self.budget = index, prompt, budget
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.state: BlockState | None = None
        self.gen: list[int] = []
        self.phase = "waiting"          # waiting -> (prefill) -> denoise <-> commit -> done
        self.finish_reason = None
        self.stop_cut = None


class Sampler:
    def __init__(self, runtime, config: DecodeConfig, plan=None, trace=None):
        """``plan``: the call's resolved ``ReusePlan`` (None: compute every layer); ``trace``: see
        ``Runtime.generate``."""
        self.rt = runtime
        self.cfg = config
        self.ids = runtime.token_ids
        self.plan = plan
        self.stop_strings = list(config.stop_strings)
        self.block_size = config.block_size
        self.sub_block_size = config.sub_block_size
        self.trace = trace
        self.planner = StepPlanner(self.ids.mask, block_size=config.block_size, sub_block_size=config.sub_block_size,
                                   use_block_cache=config.use_block_cache, plan=plan)

    # ---- main loop ---------------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]]) -> GenerationResult:
        rt, cfg, block_size = self.rt, self.cfg, self.block_size
        temps = _per_row(cfg.temperature, len(prompts), "temperature")
        top_ps = _per_row(cfg.top_p, len(prompts), "top_p")
        rows = [_Row(i, list(p), cfg.max_new_tokens, temps[i], top_ps[i], self._generator(i, temps[i]))
                for i, p in enumerate(prompts)]
        max_len = max(_round_up(len(r.prompt) + r.budget, block_size) + block_size for r in rows)
        n_slots = min(len(rows), cfg.batch_size or len(rows))
        stats = CallStats(num_layers=rt.config.num_hidden_layers, requests=len(rows))
        caches, runner = rt.pool.start_call(n_slots, max_len, self.plan, stats)
        planner = self.planner
        cache = rt.prefix_cache
        # prompts sharing a header are admitted together (results stay in prompt order)
        waiting = deque(sorted(rows, key=lambda r: r.prompt) if cache is not None else rows)
        active: list[_Row] = []
        with Lease(cache) as lease:
            self._loop(planner, caches, runner, waiting, active, lease)
        stats = runner.finish()
        stats.prefix_evictions = lease.evictions
        stats.tokens_generated = sum(len(r.gen) for r in rows)
        texts = None
        if rt.tokenizer is not None:
            texts = [self._text(r) for r in rows]
        return GenerationResult(tokens=[r.gen for r in rows], finish_reasons=[r.finish_reason for r in rows],
                                texts=texts, stats=stats)

    def _loop(self, planner, caches, runner, waiting, active, lease) -> None:
        rt = self.rt
        while waiting or active:
            admitted = []
            while waiting and caches.free_slots:
                row = waiting.popleft()
                self._admit(row, caches.alloc())
                active.append(row)
                admitted.append(row)
            if rt.prefix_cache is not None:
                self._prefill_through_cache(planner, caches, runner, lease, admitted)
                _retire_done(caches, active)
                if not active:
                    continue
            requests = [self._request(planner, row) for row in active]
            logits, logits_rows = runner.run(requests)
            greedy = _greedy_choice(logits, rt.model.backend)
            for row, req, (_, lo, hi) in zip(active, requests, logits_rows):
                self._advance(planner, row, req, logits[lo:hi], greedy[0][lo:hi], greedy[1][lo:hi])
            _retire_done(caches, active)

    def _prefill_through_cache(self, planner, caches, runner, lease, rows) -> None:
        """The prompt prefill of newly admitted rows, whole blocks served from / offered to the prefix cache."""
        rows = [r for r in rows if r.phase == "prefill"]
        if not rows:
            return
        jobs = [PrefillJob(r.state.slot, r.prompt[:r.state.block_start],
                           want_logit=len(r.prompt) == r.state.block_start) for r in rows]
        Prefiller(runner, caches, self.rt.prefix_cache, lease).run(jobs)
        scored = [job.logits for job in jobs if job.want_logit]
        conf, x0 = _greedy_choice(torch.cat(scored), self.rt.model.backend) if scored else (None, None)
        k = 0
        for row, job in zip(rows, jobs):
            req = RowRequest(Kind.PREFILL, job.slot, 0, torch.tensor(job.tokens))
            if job.want_logit:
                self._advance(planner, row, req, job.logits, conf[k:k + 1], x0[k:k + 1])
                k += 1
            else:
                self._advance(planner, row, req, None, None, None)

    # ---- per-row transitions -----------------------------------------------------------------------------
    def _admit(self, row: _Row, slot: int) -> None:
        P, block_size = len(row.prompt), self.block_size
        whole = P - P % block_size
        row.state = self.planner.new_state(slot, whole)
        if whole:
            row.phase = "prefill"
        else:
            self._start_block(row, 0, row.prompt[:])

    def _request(self, planner: StepPlanner, row: _Row) -> RowRequest:
        st = row.state
        if row.phase == "prefill":
            P = len(row.prompt)
            want = [st.block_start - 1] if P % self.block_size == 0 else []
            return RowRequest(Kind.PREFILL, st.slot, 0, torch.tensor(row.prompt[:st.block_start]), logits_at=want)
        if row.phase == "commit":
            return planner.commit_request(st)
        return planner.denoise_request(st)

    def _advance(self, planner: StepPlanner, row: _Row, req: RowRequest, logits, conf, x0) -> None:
        st, block_size = row.state, self.block_size
        if req.kind is Kind.PREFILL:
            P = len(row.prompt)
            if P % block_size:
                self._start_block(row, st.block_start, row.prompt[st.block_start:])
            else:
                self._take_ar_token(row, int(x0[0]))
            return
        if req.kind is Kind.COMMIT:
            self._take_ar_token(row, int(x0[0]))
            return
        if self.trace is not None:
            self.trace(row.index, req.kind.label, st.block_start, st.sub, st.step, logits)
        planner.after_denoise(st, req.kind)
        n = self.sub_block_size
        r = st.sub * n
        if row.temperature > 0:
            x0, conf = _sample_top_p(logits, row.temperature, row.top_p, row.generator)
        conf, x0 = conf.tolist(), x0.tolist()
        cand = [j for j in range(n) if st.pending[r + j]]
        chosen = {j for j in cand if conf[j] > self.cfg.threshold}
        chosen.add(max(cand, key=lambda j: (conf[j], -j)))
        for j in chosen:
            st.block[r + j] = x0[j]
            st.pending[r + j] = False
        if self.cfg.early_exit:
            self._lower_needed(row)
        if st.is_done():
            self._finish_block(row)

    def _start_block(self, row: _Row, block_start: int, known: list[int]) -> None:
        """Open the block at ``block_start`` holding ``known`` tokens followed by masks."""
        block_size, mask = self.block_size, self.ids.mask
        block = known + [mask] * (block_size - len(known))
        pending = [False] * len(known) + [True] * (block_size - len(known))
        row.state.new_block(block_start, block, pending)
        if self.cfg.early_exit:
            self._lower_needed(row)
        row.phase = "denoise"

    def _take_ar_token(self, row: _Row, token: int) -> None:
        """The next-token prediction of a prefill or commit forward becomes the next block's first token."""
        st = row.state
        row.gen.append(token)
        if self._check_end(row):
            return
        start = st.block_start + (self.block_size if row.phase == "commit" else 0)
        self._start_block(row, start, [token])

    def _finish_block(self, row: _Row) -> None:
        st = row.state
        recorded = len(row.prompt) + len(row.gen)      # absolute position of the next token to record
        for j, tok in enumerate(st.block):
            if st.block_start + j < recorded:
                continue
            if st.pending[j]:           # undecoded (early_exit); a decoded token may equal the mask id
                break
            row.gen.append(tok)
        if not self._check_end(row):
            row.phase = "commit"

    def _lower_needed(self, row: _Row) -> None:
        """early_exit: positions past the token budget, or after a decoded stop token preceded only by decoded
        tokens, cannot change the returned tokens, so the block may end without decoding them."""
        st = row.state
        first_gen = len(row.prompt)
        st.needed = min(st.needed, max(0, first_gen + row.budget - st.block_start))
        for j, tok in enumerate(st.block[:st.needed]):
            if st.block_start + j < first_gen:
                continue
            if st.pending[j]:
                return
            if tok == self.ids.stop:
                st.needed = j + 1
                return

    def _check_end(self, row: _Row) -> bool:
        gen = row.gen
        if self.ids.stop in gen:
            del gen[gen.index(self.ids.stop) + 1:]
            row.finish_reason = "stop_token"
        elif self.stop_strings and self._cut_at_stop_string(row):
            row.finish_reason = "stop_string"
        elif len(gen) >= row.budget:
            del gen[row.budget:]
            row.finish_reason = "length"
        else:
            return False
        if len(gen) > row.budget:
            del gen[row.budget:]
            row.finish_reason = "length"
        row.phase = "done"
        return True

    def _cut_at_stop_string(self, row: _Row) -> bool:
        tok = self.rt.require_tokenizer("stop strings")
        text = tok.decode(row.gen, skip_special_tokens=False)
        hit = _first_stop(text, self.stop_strings)
        if hit is None:
            return False
        for n in range(1, len(row.gen) + 1):
            if _first_stop(tok.decode(row.gen[:n], skip_special_tokens=False), self.stop_strings) is not None:
                del row.gen[n:]
                break
        row.stop_cut = hit
        return True

    def _text(self, row: _Row) -> str:
        text = self.rt.tokenizer.decode(row.gen, skip_special_tokens=True)
        hit = _first_stop(text, self.stop_strings) if self.stop_strings else None
        return text if hit is None else text[:hit]

    def _generator(self, index: int, temperature: float):
        if temperature <= 0:
            return None
        g = torch.Generator(device=self.rt.device)
        g.manual_seed((self.cfg.seed or 0) * 1_000_003 + index)
        return g


def _retire_done(caches, active: list) -> None:
    """Give the slots of finished rows back and drop those rows from ``active`` (in place)."""
    for row in [r for r in active if r.phase == "done"]:
        caches.release(row.state.slot)
    active[:] = [r for r in active if r.phase != "done"]


def _first_stop(text: str, stops: list[str]):
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _per_row(value, n, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts; give one per prompt or a scalar")
        return [float(v) for v in value]
    return [float(value)] * n


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
