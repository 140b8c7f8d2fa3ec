"""What one call of the unified forward computes: rows, their kinds, and where their tokens sit.

A forward packs the query windows of many rows into one token array ``[T]``. Every linear layer runs once
over all ``T`` tokens; only attention and cache writes look at row structure, through ``Group``s of rows of one
kind. Groups are laid out in a fixed order so that the rows a reuse policy skips form one contiguous tail:

    PLAIN | PREFILL | COMMIT | FULL | SUB (computing) | SUB (skipping)

Kinds (docs/design.md, Forward kinds):
* PLAIN   block-causal forward over absolute positions, nothing cached (scoring); a batch with an explicit
          ``visibility`` mask (training) is one group of equal-length PLAIN rows seeing what the mask allows;
* PREFILL clean tokens of whole blocks appended to the prefix cache;
* COMMIT  a finished 32-token block appended to the prefix cache (prefill of one block);
* FULL    the current block's 32 positions; rebuilds the block cache;
* SUB     8 positions at offset r of the block; overwrites the block cache at [r, r+8).
"""
from __future__ import annotations

import array
import dataclasses
import enum
import itertools
from dataclasses import dataclass, field

import torch


class Kind(enum.IntEnum):
    PLAIN = 0
    PREFILL = 1
    COMMIT = 2
    FULL = 3
    SUB = 4

    @property
    def label(self) -> str:
        return {0: "plain", 1: "prefill", 2: "commit", 3: "full_block", 4: "sub_block"}[int(self)]

    @property
    def extends(self) -> bool:
        """Block-causal window over own keys (all but SUB)."""
        return self is not Kind.SUB

    @property
    def writes_prefix(self) -> bool:
        return self in (Kind.PREFILL, Kind.COMMIT)

    @property
    def writes_block(self) -> bool:
        return self in (Kind.FULL, Kind.SUB)


@dataclass
class RowRequest:
    """One row of a forward, as the sampler or scorer asks for it.

    ``start``: absolute position of the first token (for SUB: the position of block offset ``r``);
    ``logits_at``: offsets inside the window whose hidden states are projected to logits (callers apply the
    token shift through ``shifted_sources``); ``skip``: this SUB row skips the policy's layers this step."""
    kind: Kind
    slot: int
    start: int
    tokens: torch.Tensor
    logits_at: list[int] = field(default_factory=list)
    skip: bool = False


@dataclass
class Group:
    kind: Kind
    skip: bool
    tok_lo: int
    tok_hi: int
    rows: list[int]                 # indices into the caller's request list
    slots: torch.Tensor             # [R] long
    starts: torch.Tensor            # [R] long: window start (extend kinds) or block start (SUB)
    lens: list[int]
    cu: torch.Tensor                # [R+1] long, offsets relative to tok_lo

    @property
    def num_rows(self) -> int:
        return len(self.rows)


@dataclass
class ForwardBatch:
    tokens: torch.Tensor            # [T]
    positions: torch.Tensor         # [T] absolute positions
    token_slot: torch.Tensor        # [T] cache slot of each token
    groups: list[Group]
    logits_index: torch.Tensor      # [N] packed token indices to project
    logits_rows: list[tuple[int, int, int]]  # per request: (request index, lo, hi) into the logits
    reuse_lo: int                   # first token of FULL/SUB rows (their reuse cache is refreshed)
    skip_from: int                  # first token of rows skipping the policy layers (T when none)
    visibility: torch.Tensor | None = None      # [rows or 1, n, n] explicit mask of PLAIN rows (training)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def counts_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.kind.label] = out.get(g.kind.label, 0) + g.num_rows
        return out


_ORDER = {Kind.PLAIN: 0, Kind.PREFILL: 1, Kind.COMMIT: 2, Kind.FULL: 3}


def _group_key(req: RowRequest):
    if req.kind is Kind.SUB:
        return (5 if req.skip else 4, False)
    if req.skip:
        raise ValueError(f"only sub-block rows may skip layers, got a {req.kind.label} row")
    return (_ORDER[req.kind], False)


@dataclass(frozen=True)
class GroupLayout:
    """Where one group sits in a packed batch: its kind, its token range, the caller's requests in it, their
    lengths, and the offset of its slots / starts / cumulative lengths in the metadata."""
    kind: Kind
    skip: bool
    tok_lo: int
    tok_hi: int
    members: list
    lens: list
    meta_offset: int


@dataclass
class PackedBatch:
    """A batch packed on the host: one int64 tensor holding tokens, positions, slots, logits indices and the
    groups' metadata, plus the layout that says how to slice it. Two batches with equal ``signature`` have
    identical layouts, so one's tensor can be copied into the other's device buffer (CUDA graph replay)."""
    host: torch.Tensor
    T: int
    n_logits: int
    layout: list[GroupLayout]
    logits_rows: list
    reuse_lo: int
    skip_from: int

    @property
    def signature(self) -> tuple:
        return tuple((g.kind, g.skip, tuple(g.lens)) for g in self.layout) + (self.n_logits,)

    @property
    def kinds(self) -> set:
        return {g.kind for g in self.layout}


def pack_batch(requests: list[RowRequest], block_size: int) -> PackedBatch:
    """Pack requests into one forward. Rows are grouped by kind (order above); within a group the caller's order
    is kept. ``logits_rows[i]`` tells where request i's logits land.

    Runs before every decode step while the GPU waits, so it builds one Python list and one tensor over its
    buffer rather than a few tensor calls per row (``array`` converts a list of ints faster than
    ``torch.tensor``)."""
    keys = [_group_key(r) for r in requests]
    order = sorted(range(len(requests)), key=keys.__getitem__)
    tokens: list[int] = []
    positions: list[int] = []
    slots_tok: list[int] = []
    logit_idx: list[int] = []
    logits_rows: list[tuple[int, int, int]] = [None] * len(requests)  # type: ignore[list-item]
    meta: list[int] = []
    layout = []
    cursor = n_logits = 0
    reuse_lo = skip_from = None
    for key_val, group in itertools.groupby(order, key=keys.__getitem__):
        members = list(group)
        kind = requests[members[0]].kind
        skip = key_val[0] == 5
        lo = cursor
        if kind in (Kind.FULL, Kind.SUB) and reuse_lo is None:
            reuse_lo = lo
        if skip and skip_from is None:
            skip_from = lo
        lens, starts, slots, cu = [], [], [], [0]
        for i in members:
            req = requests[i]
            n = req.tokens.numel()
            if n == 0:
                raise ValueError("a forward row needs at least one token")
            if kind is Kind.SUB:
                starts.append(req.start - req.start % block_size)
            else:
                if req.start % block_size and kind is not Kind.PLAIN:
                    raise ValueError(f"{kind.label} windows start on a block boundary, got {req.start}")
                starts.append(req.start)
            tokens += req.tokens.reshape(-1).tolist()
            positions.extend(range(req.start, req.start + n))
            slots_tok.extend([req.slot] * n)
            logit_idx.extend(cursor + j for j in req.logits_at)
            logits_rows[i] = (i, n_logits, n_logits + len(req.logits_at))
            n_logits += len(req.logits_at)
            lens.append(n)
            slots.append(req.slot)
            cursor += n
            cu.append(cursor - lo)
        layout.append(GroupLayout(kind, skip, lo, cursor, members, lens, len(meta)))
        meta.extend(slots + starts + cu)
    ints = array.array("q", tokens + positions + slots_tok + logit_idx + meta)
    host = torch.frombuffer(ints, dtype=torch.long) if ints else torch.zeros(0, dtype=torch.long)
    return PackedBatch(host, cursor, n_logits, layout, logits_rows,
                       cursor if reuse_lo is None else reuse_lo, cursor if skip_from is None else skip_from)


def upload(packed: PackedBatch, device, buffer: torch.Tensor | None = None) -> ForwardBatch:
    """Move a packed batch to the device (into ``buffer`` when given) and describe it as a ForwardBatch whose
    tensors are views of that one device tensor."""
    if buffer is None:
        dev = packed.host.to(device, non_blocking=True) if torch.device(device).type == "cuda" \
            else packed.host.to(device)
    else:
        buffer.copy_(packed.host, non_blocking=True)
        dev = buffer
    T, n_log = packed.T, packed.n_logits
    meta_dev = dev[3 * T + n_log:]
    groups = []
    for g in packed.layout:
        R, off = len(g.members), g.meta_offset
        groups.append(Group(kind=g.kind, skip=g.skip, tok_lo=g.tok_lo, tok_hi=g.tok_hi, rows=g.members,
                            slots=meta_dev[off:off + R], starts=meta_dev[off + R:off + 2 * R], lens=g.lens,
                            cu=meta_dev[off + 2 * R:off + 3 * R + 1]))
    return ForwardBatch(tokens=dev[:T], positions=dev[T:2 * T], token_slot=dev[2 * T:3 * T], groups=groups,
                        logits_index=dev[3 * T:3 * T + n_log], logits_rows=packed.logits_rows,
                        reuse_lo=packed.reuse_lo, skip_from=packed.skip_from)


def rebind(batch: ForwardBatch, packed: PackedBatch) -> ForwardBatch:
    """``batch`` (uploaded for a packing of the same signature, e.g. a CUDA graph's captured batch) describing
    ``packed``: the device views are reused, the host-side fields (which request is where) are ``packed``'s.
    Costs a few object constructions, where ``upload`` slices the device buffer anew. The caller copies
    ``packed.host`` into the buffer behind ``batch``."""
    groups = [dataclasses.replace(g, rows=lay.members) for g, lay in zip(batch.groups, packed.layout)]
    return dataclasses.replace(batch, groups=groups, logits_rows=packed.logits_rows)


def build_batch(requests: list[RowRequest], device, block_size: int) -> ForwardBatch:
    return upload(pack_batch(requests, block_size), device)


def shifted_sources(targets: list[int]) -> list[int]:
    """The token-shift rule (docs/design.md, Forward kinds), in one place: the prediction for window offset j is read from the
    hidden state at j-1. Offset 0 has no source inside the window; like the original we read its own slot,
    and callers guarantee that slot is never used for a masked position."""
    return [max(t - 1, 0) for t in targets]


def dense_batch(input_ids: torch.Tensor, positions: torch.Tensor, visibility: torch.Tensor,
                logits_slice: slice) -> ForwardBatch:
    """B equal-length PLAIN rows ``input_ids`` [B, N] at ``positions`` [B or 1, N], each token seeing what
    ``visibility`` [B or 1, N, N] allows (True = may attend), with logits for ``logits_slice`` of every row:
    the training objective's forward as rows of the one forward."""
    B, N = input_ids.shape
    dev = input_ids.device
    at = list(range(N))[logits_slice]
    index = torch.tensor([b * N + j for b in range(B) for j in at], dtype=torch.long, device=dev)
    group = Group(kind=Kind.PLAIN, skip=False, tok_lo=0, tok_hi=B * N, rows=list(range(B)),
                  slots=torch.zeros(B, dtype=torch.long, device=dev), starts=torch.zeros(B, dtype=torch.long, device=dev),
                  lens=[N] * B, cu=torch.arange(0, B * N + 1, N, device=dev))
    return ForwardBatch(tokens=input_ids.reshape(-1), positions=positions.expand(B, N).reshape(-1),
                        token_slot=torch.zeros(B * N, dtype=torch.long, device=dev), groups=[group],
                        logits_index=index, logits_rows=[(b, b * len(at), (b + 1) * len(at)) for b in range(B)],
                        reuse_lo=B * N, skip_from=B * N, visibility=visibility)


def cache_write_ranges(groups: list[Group]):
    """The contiguous token ranges whose K/V go to the prefix cache and to the block cache (None when empty)."""
    pre = [g for g in groups if g.kind.writes_prefix]
    blk = [g for g in groups if g.kind.writes_block]
    return ((pre[0].tok_lo, pre[-1].tok_hi) if pre else None, (blk[0].tok_lo, blk[-1].tok_hi) if blk else None)
