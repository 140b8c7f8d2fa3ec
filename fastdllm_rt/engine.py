"""Block-diffusion decoding state shared by the sampler and the scorer.

Each sequence carries its own ``BlockState``: its cache slot, its current block, which positions are still to
be decoded, its sub-block and step counters. The forward kind of every step is chosen per row with the
original rule (spec §3.2 step 4), so a row in a batch takes exactly the steps it would take alone, and a mixed
step (some rows FULL, some SUB, some committing) is still one packed forward.
"""
from __future__ import annotations

import time

import torch

from .batch import Kind, RowRequest, build_batch, shifted_sources
from .errors import NumericsError
from .profiling import forward_name, named_range
from .stats import CallStats, ForwardTimer

class BlockState:
    """One sequence's progress inside its current block.

    ``block``: the block's tokens (mask where undecoded); ``pending``: masked positions that take part in
    decoding (they compete for unmasking); ``needed``: block offsets below it must be decoded before the block
    is done (an early exit may lower it; it never changes which positions compete, so tokens stay the same);
    ``sub``: current sub-block; ``step``: denoising forwards taken in this block (contract §1: numbered from
    0); ``block_cache_valid``: a FULL forward built this block's cache."""
    __slots__ = ("slot", "block_start", "block", "pending", "sub", "step", "block_cache_valid", "sub_size",
                 "needed")

    def __init__(self, slot: int, block_start: int, block: list[int], pending: list[bool], sub_size: int = 8):
        self.slot = slot
        self.sub_size = sub_size
        self.needed = len(block)
        self.block_start = block_start
        self.block = block
        self.pending = pending
        self.sub = 0
        self.step = 0
        self.block_cache_valid = False

    def current_sub(self) -> int | None:
        """First sub-block (from the current one on) that still holds pending positions; None when done."""
        n_sub = len(self.block) // self.sub_size
        while self.sub < n_sub:
            lo = self.sub * self.sub_size
            if any(self.pending[lo:lo + self.sub_size]):
                return self.sub
            self.sub += 1
        return None

    def is_done(self) -> bool:
        return not any(self.pending[:self.needed])

    def new_block(self, block_start: int, block: list[int], pending: list[bool]) -> None:
        self.block_start, self.block, self.pending = block_start, block, pending
        self.needed = len(block)
        self.sub = self.step = 0
        self.block_cache_valid = False


class Engine:
    """Builds each step's packed forward from row states, runs it, and keeps the call's counters."""

    def __init__(self, model, caches, mask_id: int, *, use_block_cache: bool, sub_size: int = 8, reuse=None,
                 stats: CallStats, max_tokens: int | None = None):
        self.model = model
        self.max_tokens = max_tokens or (16384 if model.device.type == "cuda" else 4096)
        self.sub_size = sub_size
        self.caches = caches
        self.mask_id = mask_id
        self.use_block_cache = use_block_cache
        self.reuse = reuse
        self.stats = stats
        self.block_size = model.config.bd_size
        self.device = model.device
        self.timer = ForwardTimer(self.device)
        self._t0 = time.perf_counter()
        self.graphs = caches.graph_runner(model, reuse) if (
            caches is not None and model.ops.name == "triton" and self.device.type == "cuda") else None
        model.reset_counters()

    # ---- requests ----------------------------------------------------------------------------------------
    def denoise_request(self, row: BlockState, targets: list[int] | None = None) -> RowRequest:
        """The original's choice (spec §3.2): a sub-block forward when the block cache is valid and the
        sub-block's first position is decoded, else a full-block forward. Logits cover the sub-block's 8
        target positions through the token shift."""
        s = row.current_sub()
        assert s is not None, "denoise_request on a row with nothing pending"
        n = self.sub_size
        r = s * n
        targets = range(r, r + n) if targets is None else targets
        if self.use_block_cache and row.block_cache_valid and row.block[r] != self.mask_id:
            skip = self.reuse is not None and self.reuse.should_skip_step(row.step)
            return RowRequest(Kind.SUB, row.slot, row.block_start + r, torch.tensor(row.block[r:r + n]),
                              logits_at=shifted_sources([t - r for t in targets]), skip=skip)
        return RowRequest(Kind.FULL, row.slot, row.block_start, torch.tensor(row.block),
                          logits_at=shifted_sources(list(targets)))

    def new_state(self, slot: int, block_start: int = 0) -> BlockState:
        return BlockState(slot, block_start, [], [], self.sub_size)

    def commit_request(self, row: BlockState) -> RowRequest:
        """Commit the finished block into the prefix cache; its last logit predicts the next block's first token."""
        return RowRequest(Kind.COMMIT, row.slot, row.block_start, torch.tensor(row.block),
                          logits_at=[self.block_size - 1])

    def after_denoise(self, row: BlockState, kind: Kind) -> None:
        row.step += 1
        if kind is Kind.FULL and self.use_block_cache:
            row.block_cache_valid = True

    # ---- running -----------------------------------------------------------------------------------------
    def run(self, requests: list[RowRequest]):
        """One forward over all requests (several when they hold more than ``max_tokens`` tokens, e.g. a large
        prefill, so activation memory stays bounded); returns (fp32 logits, object with ``logits_rows``)."""
        if sum(r.tokens.numel() for r in requests) > self.max_tokens and len(requests) > 1:
            parts, chunk, size = [], [], 0
            for i, r in enumerate(requests):
                n = r.tokens.numel()
                if chunk and size + n > self.max_tokens:
                    parts.append(chunk)
                    chunk, size = [], 0
                chunk.append(i)
                size += n
            parts.append(chunk)
            logits, rows, offset = [], [None] * len(requests), 0
            for idx in parts:
                lg, b = self._run([requests[i] for i in idx])
                for (j, lo, hi), i in zip(b.logits_rows, idx):
                    rows[i] = (i, offset + lo, offset + hi)
                logits.append(lg)
                offset += lg.shape[0]
            return torch.cat(logits), _Rows(rows)
        return self._run(requests)

    def _run(self, requests: list[RowRequest]):
        self.timer.start()
        with named_range(forward_name(requests), self.device):
            if self.graphs is not None:
                logits, batch = self.graphs.forward(requests, self.block_size)
            else:
                batch = build_batch(requests, self.device, self.block_size)
                logits = self.model(batch, self.caches, self.reuse)
        self.timer.stop()
        st = self.stats
        st.model_calls += 1
        st.tokens_forwarded += batch.num_tokens
        for label, rows in batch.counts_by_kind().items():
            st.forwards[label] += 1
            st.row_forwards[label] += rows
        return logits, batch

    def finish(self) -> CallStats:
        st = self.stats
        st.forward_time_s, st.timer = self.timer.finish()
        st.wall_time_s = time.perf_counter() - self._t0
        st.layers_computed = list(self.model.layer_rows_computed)
        st.layers_skipped = list(self.model.layer_rows_skipped)
        st.device = str(self.device)
        return st


class _Rows:
    def __init__(self, logits_rows):
        self.logits_rows = logits_rows


def check_finite(flag: torch.Tensor | bool, what: str) -> None:
    if not bool(flag):
        raise NumericsError(f"the model produced non-finite logits during {what}; the weights or the dtype are "
                            f"wrong (try dtype='fp32' to confirm, or check the checkpoint for NaN/Inf)")
