"""Block-diffusion decoding state shared by the sampler and the scorer, and the step requests built from it.

Each sequence carries its own ``BlockState``: its cache slot, its current block, which positions are still to
be decoded, its sub-block and step counters. ``StepPlanner`` chooses every row's forward kind with the
original rule, so a row in a batch takes exactly the steps it would take alone, and a mixed step (some rows
FULL, some SUB, some committing) is still one packed forward.
"""
from __future__ import annotations

import torch

from .batch import Kind, RowRequest, shifted_sources


class BlockState:
    """One sequence's progress inside its current block.

    ``block``: the block's tokens (mask where undecoded); ``pending``: masked positions that take part in
    decoding (they compete for unmasking); ``needed``: block offsets below it must be decoded before the block
    is done (an early exit may lower it; it never changes which positions compete, so tokens stay the same);
    ``sub``: current sub-block; ``step``: denoising forwards taken in this block, numbered from 0;
    ``block_cache_valid``: a FULL forward built this block's cache."""
    __slots__ = ("slot", "block_start", "block", "pending", "sub", "step", "block_cache_valid", "sub_block_size",
                 "needed")

    def __init__(self, slot: int, block_start: int, block: list[int], pending: list[bool], sub_block_size: int):
        self.slot = slot
        self.sub_block_size = sub_block_size
        self.needed = len(block)
        self.block_start = block_start
        self.block = block
        self.pending = pending
        self.sub = 0
        self.step = 0
        self.block_cache_valid = False

    def current_sub(self) -> int | None:
        """First sub-block (from the current one on) that still holds pending positions; None when done."""
        n_sub = len(self.block) // self.sub_block_size
        while self.sub < n_sub:
            lo = self.sub * self.sub_block_size
            if any(self.pending[lo:lo + self.sub_block_size]):
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


class StepPlanner:
    """Builds each row's next denoising or commit request from its ``BlockState``."""

    def __init__(self, mask_id: int, *, block_size: int, sub_block_size: int, use_block_cache: bool, plan=None):
        self.mask_id = mask_id
        self.block_size = block_size
        self.sub_block_size = sub_block_size
        self.use_block_cache = use_block_cache
        self.plan = plan                    # a ReusePlan or None

    def new_state(self, slot: int, block_start: int = 0) -> BlockState:
        return BlockState(slot, block_start, [], [], self.sub_block_size)

    def denoise_request(self, row: BlockState, targets: list[int] | None = None) -> RowRequest:
        """The original's choice: a sub-block forward when the block cache is valid and the sub-block's first
        position is decoded, else a full-block forward. Logits cover the sub-block's target positions through
        the token shift."""
        s = row.current_sub()
        assert s is not None, "denoise_request on a row with nothing pending"
        n = self.sub_block_size
        r = s * n
        targets = range(r, r + n) if targets is None else targets
        if self.use_block_cache and row.block_cache_valid and row.block[r] != self.mask_id:
            skip = self.plan is not None and self.plan.skips_step(row.step)
            return RowRequest(Kind.SUB, row.slot, row.block_start + r, torch.tensor(row.block[r:r + n]),
                              logits_at=shifted_sources([t - r for t in targets]), skip=skip)
        return RowRequest(Kind.FULL, row.slot, row.block_start, torch.tensor(row.block),
                          logits_at=shifted_sources(list(targets)))

    def commit_request(self, row: BlockState) -> RowRequest:
        """Commit the finished block into the prefix cache; its last logit predicts the next block's first token."""
        return RowRequest(Kind.COMMIT, row.slot, row.block_start, torch.tensor(row.block),
                          logits_at=[self.block_size - 1])

    def after_denoise(self, row: BlockState, kind: Kind) -> None:
        row.step += 1
        if kind is Kind.FULL and self.use_block_cache:
            row.block_cache_valid = True
