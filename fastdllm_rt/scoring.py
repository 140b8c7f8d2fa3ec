"""The two scoring procedures over one chunk of requests (docs/design.md, Trajectory scoring).

``trajectory`` (default): the sampler's own procedure with the answer known. The context's whole blocks are
prefilled; in each block holding continuation tokens the denoising loop runs with the sampler's sub-block
order and full/sub-block choice; each step reveals the leftmost still-masked continuation token of the current
sub-block and adds its log-probability; finished blocks are committed and their last logit predicts the next
block's first token. Positions after the continuation stay masked. The reuse policy acts on the same steps as
in sampling. ``reveal="threshold"`` additionally reveals, at each step, every later continuation token of the
sub-block whose probability exceeds ``threshold`` (the sampler's parallel unmasking under teacher forcing).

Requests are replayed as a tree: requests with the same context start in one node (the context prefill is
computed once); a node advances one step for all its requests and splits only when their revealed tokens
differ, so identical scoring inputs are computed once (MMLU's four one-token choices cost one forward).

``first_token``: the original evaluation exactly: mask the first continuation token, stop token
after the continuation, masks to the block end, one plain forward, log p(first token). Identical inputs are
forwarded once and the whole blocks before the scored one are prefilled once per distinct prefix. Those blocks
hold only context tokens, so the prefix cache serves them too: the plain forward of the scored block reads
the same K/V bits either way.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .batch import Kind, RowRequest
from .decoding import StepPlanner
from .forwards import ForwardRunner, check_finite
from .prefill import PrefillJob


class _Node:
    """Requests sharing a context and every continuation token revealed so far, hence one decoding state."""
    __slots__ = ("requests", "state", "phase")

    def __init__(self, requests, state, phase):
        self.requests, self.state, self.phase = requests, state, phase   # phase: prefill | denoise | commit


class ScoreChunk:
    """Bookkeeping shared by both scorers for one chunk of requests."""

    def __init__(self, requests, ll, greedy):
        self.requests, self.ll, self.greedy = requests, ll, greedy
        self.tokens_scored = 0

    def end(self, i):
        ctx, cont = self.requests[i]
        return len(ctx) + len(cont)

    def token_at(self, i, pos):
        ctx, cont = self.requests[i]
        return cont[pos - len(ctx)]


def _gather_logp(logits, pairs, backend):
    """pairs: [(logits row, token)] -> host lists (log p, is argmax). The backend computes them with their
    finiteness (``token_logp``), copied to the host in one transfer: the host waits for the GPU once a step."""
    if not pairs:
        return [], []
    dev = logits.device
    rows = torch.tensor([r for r, _ in pairs], device=dev)
    toks = torch.tensor([t for _, t in pairs], device=dev)
    host = backend.token_logp(logits[rows], toks).cpu()
    check_finite(bool(host[2].all()), "scoring")
    return host[0].tolist(), [bool(x) for x in host[1].tolist()]


class TrajectoryScorer:
    def __init__(self, runner: ForwardRunner, planner: StepPlanner, caches, *, reveal: str, threshold: float,
                 prefiller=None):
        """``prefiller``: a ``Prefiller`` serving context blocks from the prefix cache (None: plain prefill)."""
        self.runner, self.planner, self.caches, self.prefiller = runner, planner, caches, prefiller
        self.mask, self.block_size, self.sub_block_size = planner.mask_id, planner.block_size, planner.sub_block_size
        self.reveal, self.log_threshold = reveal, (math.log(threshold) if threshold > 0 else -math.inf)

    def run(self, chunk: ScoreChunk) -> None:
        self.c = chunk
        groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i, (ctx, _) in enumerate(chunk.requests):
            groups.setdefault(tuple(ctx), []).append(i)
        nodes = []
        for ctx, members in groups.items():
            whole = len(ctx) - len(ctx) % self.block_size
            node = _Node(members, self.planner.new_state(self.caches.alloc(), whole), "prefill")
            if not whole:
                self._open_block(node, 0, [])
            nodes.append(node)
        if self.prefiller is not None:
            nodes = self._prefill_through_cache(nodes)
        while nodes:
            plans = [self._plan(node) for node in nodes]
            logits, logits_rows = self.runner.run([req for req, _ in plans])
            nodes = self._step(nodes, plans, logits, logits_rows)

    def _prefill_through_cache(self, nodes: list[_Node]) -> list[_Node]:
        """The prefill phase of every node at once, its whole context blocks served from / offered to the
        prefix cache; a context ending on a block boundary scores its first token from the prefill's logits."""
        todo = [n for n in nodes if n.phase == "prefill"]
        jobs = []
        for node in todo:
            ctx = self.c.requests[node.requests[0]][0]
            jobs.append(PrefillJob(node.state.slot, ctx[:node.state.block_start],
                                   want_logit=node.state.block_start == len(ctx)))
        self.prefiller.run(jobs)
        out = [n for n in nodes if n.phase != "prefill"]
        scoring, plans, rows, parts = [], [], [], []
        for node, job in zip(todo, jobs):
            if job.want_logit:
                req = RowRequest(Kind.PREFILL, node.state.slot, 0, torch.tensor(job.tokens), logits_at=[0])
                scoring.append(node)
                plans.append((req, [(0, node.state.block_start)]))
                rows.append((len(rows), len(parts), len(parts) + 1))
                parts.append(job.logits)
            else:
                self._open_block(node, node.state.block_start, [])
                out.append(node)
        if scoring:
            out += self._step(scoring, plans, torch.cat(parts), rows)
        return out

    def _step(self, nodes, plans, logits, logits_rows) -> list[_Node]:
        """Add the log-probabilities this step revealed and advance every node; returns the live nodes."""
        chunk = self.c
        pairs, where = [], []
        for node, (req, positions), (_, lo, _) in zip(nodes, plans, logits_rows):
            mine = []
            for j, pos in positions:
                for i in node.requests:
                    if pos < chunk.end(i):
                        mine.append((i, pos, len(pairs)))
                        pairs.append((lo + j, chunk.token_at(i, pos)))
            where.append(mine)
        logp, argmax = _gather_logp(logits, pairs, self.runner.model.backend)
        return [child for node, (req, positions), mine in zip(nodes, plans, where)
                for child in self._advance(node, req, positions, [(i, p, logp[k], argmax[k]) for i, p, k in mine])]

    # ---- planning ----------------------------------------------------------------------------------------
    def _open_block(self, node: _Node, block_start: int, known: list[int]) -> None:
        """Context and revealed tokens known; continuation positions pending; positions past the longest
        continuation masked and never revealed (the model is not told what follows)."""
        ctx = self.c.requests[node.requests[0]][0]
        end = max(self.c.end(i) for i in node.requests)
        block, pending = [], []
        for j in range(self.block_size):
            pos = block_start + j
            if pos < len(ctx):
                block.append(ctx[pos])
            elif j < len(known):
                block.append(known[j])
            else:
                block.append(self.mask)
            pending.append(block[-1] == self.mask and pos < end)
        node.state.new_block(block_start, block, pending)
        node.phase = "denoise"

    def _plan(self, node: _Node):
        """(row request, [(logits offset, absolute position revealable this step)])."""
        st, block_size = node.state, self.block_size
        if node.phase == "prefill":
            ctx = self.c.requests[node.requests[0]][0]
            scores = st.block_start == len(ctx)
            req = RowRequest(Kind.PREFILL, st.slot, 0, torch.tensor(ctx[:st.block_start]),
                             logits_at=[st.block_start - 1] if scores else [])
            return req, ([(0, st.block_start)] if scores else [])
        if node.phase == "commit":
            return self.planner.commit_request(st), [(0, st.block_start + block_size)]
        r = st.current_sub() * self.sub_block_size
        offsets = [r + j for j in range(self.sub_block_size) if st.pending[r + j]]
        if self.reveal == "one":
            offsets = offsets[:1]                  # project only the row this step reads
        req = self.planner.denoise_request(st, targets=offsets)
        return req, [(k, st.block_start + off) for k, off in enumerate(offsets)]

    # ---- advancing ---------------------------------------------------------------------------------------
    def _advance(self, node: _Node, req: RowRequest, positions, picks) -> list[_Node]:
        st = node.state
        if not positions:                       # a prefill that scores nothing (context ends mid-block)
            self._open_block(node, st.block_start, [])
            return [node]
        if req.kind in (Kind.FULL, Kind.SUB):
            self.planner.after_denoise(st, req.kind)
        first = positions[0][1]
        revealed = {i: [] for i in node.requests}
        for i, pos, logp, greedy in picks:
            if pos == first or logp > self.log_threshold:
                self.c.ll[i] += logp
                self.c.greedy[i] &= greedy
                self.c.tokens_scored += 1
                revealed[i].append((pos, self.c.token_at(i, pos)))
        children: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i in node.requests:
            key = tuple(revealed[i])
            shown = {p for p, _ in key}
            if not all(p in shown for p in range(first, self.c.end(i))):
                children.setdefault(key, []).append(i)
        if not children:
            self.caches.release(st.slot)
            return []
        keep = st.block_start + (self.block_size if req.kind is Kind.COMMIT else 0)
        out = []
        for n, (key, members) in enumerate(children.items()):
            child = node if n == 0 else self._fork(node, keep)
            child.requests = members
            out.append((child, key))
        for child, key in out:
            self._reveal(child, req.kind, key)
        return [child for child, _ in out]

    def _fork(self, node: _Node, prefix_len: int) -> _Node:
        st = node.state
        slot = self.caches.alloc()
        self.caches.fork(st.slot, slot, prefix_len)
        twin = self.planner.new_state(slot, st.block_start)
        twin.block, twin.pending = list(st.block), list(st.pending)
        twin.sub, twin.step, twin.block_cache_valid = st.sub, st.step, st.block_cache_valid
        return _Node(list(node.requests), twin, node.phase)

    def _reveal(self, node: _Node, kind: Kind, key) -> None:
        st = node.state
        if kind in (Kind.PREFILL, Kind.COMMIT):
            start = st.block_start + (self.block_size if kind is Kind.COMMIT else 0)
            self._open_block(node, start, [tok for _, tok in key])
            return
        for pos, tok in key:
            st.block[pos - st.block_start] = tok
            st.pending[pos - st.block_start] = False
        end = max(self.c.end(i) for i in node.requests)
        for j in range(self.block_size):
            if st.block_start + j >= end:
                st.pending[j] = False
        if st.current_sub() is None:
            node.phase = "commit"


class FirstTokenScorer:
    """The original evaluation, batched: shared prefixes prefilled once, identical inputs once."""

    def __init__(self, runner: ForwardRunner, caches, *, mask_id, stop_id, block_size, prefiller=None):
        """``prefiller``: a ``Prefiller`` serving the prefixes from the prefix cache (None: plain prefill)."""
        self.runner, self.caches, self.prefiller = runner, caches, prefiller
        self.mask, self.stop, self.block_size = mask_id, stop_id, block_size

    def original_input(self, ctx, cont) -> list[int]:
        seq = list(ctx) + list(cont)
        n = len(seq)
        x = seq + [self.mask] * ((n // self.block_size + 1) * self.block_size - n)
        x[len(ctx)] = self.mask
        x[n] = self.stop
        return x

    def run(self, chunk: ScoreChunk) -> None:
        block_size = self.block_size
        prefixes: "OrderedDict[tuple, int]" = OrderedDict()     # prefix -> slot
        rows: "OrderedDict[tuple, list[int]]" = OrderedDict()   # (prefix, last block) -> requests
        for i, (ctx, cont) in enumerate(chunk.requests):
            x = self.original_input(ctx, cont)
            b = (len(ctx) - 1) // block_size
            key = (tuple(x[:b * block_size]), tuple(x[b * block_size:(b + 1) * block_size]))
            rows.setdefault(key, []).append(i)
            if key[0] and key[0] not in prefixes:
                prefixes[key[0]] = self.caches.alloc()
        if prefixes and self.prefiller is not None:
            self.prefiller.run([PrefillJob(slot, list(p)) for p, slot in prefixes.items()])
        elif prefixes:
            self.runner.run([RowRequest(Kind.PREFILL, slot, 0, torch.tensor(p)) for p, slot in prefixes.items()])
        scratch = self.caches.alloc() if any(not k[0] for k in rows) else None
        reqs, pairs = [], []
        for (prefix, block), members in rows.items():
            at = len(chunk.requests[members[0]][0]) - 1 - len(prefix)
            slot = prefixes[prefix] if prefix else scratch
            reqs.append(RowRequest(Kind.PLAIN, slot, len(prefix), torch.tensor(block), logits_at=[at]))
        logits, logits_rows = self.runner.run(reqs)
        for (_, members), (_, lo, _) in zip(rows.items(), logits_rows):
            for i in members:
                pairs.append((lo, chunk.requests[i][1][0]))
        logp, argmax = _gather_logp(logits, pairs, self.runner.model.backend)
        k = 0
        for members in rows.values():
            for i in members:
                chunk.ll[i] = logp[k]
                chunk.greedy[i] = argmax[k] and len(chunk.requests[i][1]) == 1
                chunk.tokens_scored += 1
                k += 1
        for slot in prefixes.values():
            self.caches.release(slot)
        if scratch is not None:
            self.caches.release(scratch)
