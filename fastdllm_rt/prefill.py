"""Prefill of context / prompt blocks through the prefix cache (docs/design.md, Prefix cache).

Each job names a slot and the whole blocks of clean tokens its prefix cache must hold. Blocks already in the
prefix cache are copied into the slot; blocks that several jobs of this batch share but the cache lacks are
computed once, by one of them (a round of forwards), and copied into the others' slots; each job then computes
only its own remaining blocks. Every block a job computes is offered to the cache. A job that wants the last
position's logits always computes its last block (a cached block has K/V but no logits).

Exactness: a block's K/V depend only on the tokens of the blocks up to it (the torch backend attends each query
block over exactly the keys it sees, and on the CPU runs every matmul in fixed tiles of rows), so copied K/V and
logits are bit-identical to those of a prefill of the whole context in one forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .batch import Kind, RowRequest


@dataclass
class PrefillJob:
    slot: int
    tokens: list                    # whole blocks of context tokens
    want_logit: bool = False        # the logits of the last position (the next token's prediction)
    logits: torch.Tensor | None = None          # [1, vocab] after ``run`` when ``want_logit``
    chain: list = field(default_factory=list)   # cached blocks of ``tokens`` (the last is the insert parent)
    done: int = 0                   # blocks in the slot so far


def _copy(dst_k, dst_v, slot, lo, k, v):
    dst_k[:, slot, :, lo:lo + k.shape[2]] = k
    dst_v[:, slot, :, lo:lo + v.shape[2]] = v


def _shared_blocks(a, b, bs: int, n: int) -> int:
    """Leading whole blocks (at most ``n``) that token lists ``a`` and ``b`` share."""
    m = 0
    while m < n and a[m * bs:(m + 1) * bs] == b[m * bs:(m + 1) * bs]:
        m += 1
    return m


class Prefiller:
    def __init__(self, runner, caches, cache, lease):
        """``cache``: the runtime's ``PrefixCache``; ``lease``: pins the blocks this unit of work reads."""
        self.runner, self.caches, self.cache, self.lease = runner, caches, cache, lease
        self.block_size = caches.block_size

    def run(self, jobs: list[PrefillJob]) -> None:
        bs, caches, stats = self.block_size, self.caches, self.runner.stats
        for job in jobs:
            n = len(job.tokens) // bs
            job.chain = self.cache.match(job.tokens, n - 1 if job.want_logit else n)
            self.lease.pin(job.chain)
            if job.chain:
                _copy(caches.prefix_k, caches.prefix_v, job.slot, 0,
                      torch.cat([b.k for b in job.chain], dim=2), torch.cat([b.v for b in job.chain], dim=2))
            job.done = len(job.chain)
            stats.prefix_tokens_served += job.done * bs
        pending = [j for j in jobs if j.done < len(j.tokens) // bs]
        while pending:
            pending = self._round(pending)

    def _round(self, pending: list[PrefillJob]) -> list[PrefillJob]:
        """One forward: per distinct shared prefix one leader computes it; the followers copy it."""
        bs = self.block_size
        order = sorted(pending, key=lambda j: j.tokens)
        target = {}
        for i, job in enumerate(order):
            n = len(job.tokens) // bs
            near = [order[k] for k in (i - 1, i + 1) if 0 <= k < len(order)]
            t = max((_shared_blocks(job.tokens, o.tokens, bs, n) for o in near), default=0)
            target[id(job)] = t if t > job.done else n
        leaders: dict = {}
        for job in pending:
            t = target[id(job)]
            leaders.setdefault((t, tuple(job.tokens[:t * bs])), []).append(job)
        requests, heads = [], []
        for (t, _), members in leaders.items():
            lead = members[0]
            final = any(m.want_logit and t == len(m.tokens) // bs for m in members)
            want = [(t - lead.done) * bs - 1] if final else []
            requests.append(RowRequest(Kind.PREFILL, lead.slot, lead.done * bs,
                                       torch.tensor(lead.tokens[lead.done * bs:t * bs]), logits_at=want))
            heads.append((t, members))
        logits, rows = self.runner.run(requests)
        caches = self.caches
        for (t, members), (_, lo, hi) in zip(heads, rows):
            lead = members[0]
            self._offer(lead, t)
            for job in members[1:]:
                a, b = job.done * bs, t * bs
                _copy(caches.prefix_k, caches.prefix_v, job.slot, a, caches.prefix_k[:, lead.slot, :, a:b],
                      caches.prefix_v[:, lead.slot, :, a:b])
                self.runner.stats.prefix_tokens_served += b - a
                job.done, job.chain = t, list(lead.chain)
            for job in members:
                if job.want_logit and t == len(job.tokens) // bs:
                    job.logits = logits[lo:hi]
        return [j for j in pending if j.done < len(j.tokens) // bs]

    def _offer(self, job: PrefillJob, upto: int) -> None:
        """Insert the blocks ``job`` just computed (``[done, upto)``) under its cached chain."""
        bs, caches = self.block_size, self.caches
        chained = len(job.chain) == job.done
        for b in range(job.done, upto):
            if chained:
                parent = job.chain[-1] if job.chain else None
                node = self.cache.insert(parent, job.tokens[b * bs:(b + 1) * bs],
                                         caches.prefix_k[:, job.slot, :, b * bs:(b + 1) * bs],
                                         caches.prefix_v[:, job.slot, :, b * bs:(b + 1) * bs])
                if node is None:
                    chained = False
                else:
                    self.lease.pin([node])
                    job.chain.append(node)
        job.done = upto
