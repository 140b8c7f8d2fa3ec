"""The prefix cache: K/V of whole committed context blocks, kept across requests and calls of one runtime
(docs/design.md, Prefix cache).

A trie of blocks: a node is one block of ``block_size`` token ids, keyed among its parent's children by those
ids themselves (a dict of tuples: the hash finds the candidate, the tuple comparison verifies every id), so a
node stands for exactly one token prefix and its K/V (every layer, ``[L, Hkv, block_size, D]``) are the ones
any row with that prefix would compute for that block. Memory is bounded by ``budget`` bytes: a block that
does not fit evicts the least recently used unpinned leaves; pinned blocks (read by the running chunk) are never
evicted, and when nothing can be evicted the block is simply not cached.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch


class Block:
    __slots__ = ("tokens", "parent", "children", "k", "v", "pins", "nbytes")

    def __init__(self, tokens, parent, k=None, v=None):
        self.tokens, self.parent, self.children = tokens, parent, {}
        self.k, self.v = k, v
        self.pins = 0
        self.nbytes = 0 if k is None else 2 * k.numel() * k.element_size()


class Lease:
    """The blocks one unit of work (a scoring chunk, a generation call) reads: pinned until ``close`` (or the
    end of a ``with`` block); ``evictions`` counts the blocks the cache evicted meanwhile. With ``cache`` None
    (the prefix cache off) it pins nothing and counts no evictions."""

    def __init__(self, cache: "PrefixCache | None"):
        self.cache, self.blocks = cache, []
        self._evictions_before = cache.evictions if cache is not None else 0

    @property
    def evictions(self) -> int:
        return self.cache.evictions - self._evictions_before if self.cache is not None else 0

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pin(self, blocks) -> None:
        for b in blocks:
            b.pins += 1
            self.blocks.append(b)

    def close(self) -> None:
        for b in self.blocks:
            b.pins -= 1
        self.blocks = []


class PrefixCache:
    def __init__(self, block_size: int, budget: int | None = None, device=None):
        self.block_size = block_size
        self._budget = budget
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.root = Block((), None)
        self.bytes = 0
        self.blocks = 0
        self.evictions = 0
        self._lru: OrderedDict = OrderedDict()      # id(block) -> block, least recently used first

    @property
    def budget(self) -> int:
        """Bytes the cache may hold (default: 15 % of the device's free memory when first asked)."""
        if self._budget is None:
            self._budget = int(0.15 * free_memory(self.device))
        return self._budget

    # ---- lookup and insertion ----------------------------------------------------------------------------
    def match(self, tokens, max_blocks: int) -> list[Block]:
        """The cached chain of the longest whole-block prefix of ``tokens`` (at most ``max_blocks`` blocks)."""
        bs, node, chain = self.block_size, self.root, []
        for b in range(max_blocks):
            node = node.children.get(tuple(tokens[b * bs:(b + 1) * bs]))
            if node is None:
                break
            self._lru.move_to_end(id(node))
            chain.append(node)
        return chain

    def insert(self, parent: Block | None, tokens, k: torch.Tensor, v: torch.Tensor) -> Block | None:
        """The child of ``parent`` (None: the root) holding block ``tokens`` with K/V ``k``, ``v`` (copied);
        None when the budget has no room even after evicting every unpinned leaf."""
        parent = parent or self.root
        key = tuple(tokens)
        node = parent.children.get(key)
        if node is None:
            need = 2 * k.numel() * k.element_size()
            parent.pins += 1                 # the chain being extended is not an eviction candidate
            room = self._make_room(need)
            parent.pins -= 1
            if not room:
                return None
            node = Block(key, parent, k.clone(), v.clone())
            parent.children[key] = node
            self.bytes += node.nbytes
            self.blocks += 1
            self._lru[id(node)] = node
        self._lru.move_to_end(id(node))
        return node

    # ---- eviction ----------------------------------------------------------------------------------------
    def _make_room(self, need: int) -> bool:
        if need > self.budget:
            return False
        while self.bytes + need > self.budget:
            # the least recently used unpinned leaf (a chain's parent was used no later than its children, so
            # a header's tail goes before its head); one pass of the recency order, not a sort per block
            victim = next((b for b in self._lru.values() if not b.children and not b.pins), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, node: Block) -> None:
        del node.parent.children[node.tokens]
        del self._lru[id(node)]
        node.k = node.v = None
        self.bytes -= node.nbytes
        self.blocks -= 1
        self.evictions += 1

    def shrink(self) -> int:
        """Under memory pressure: evict every unpinned block and halve the budget; returns the bytes freed."""
        before = self.bytes
        while True:
            leaves = [b for b in self._lru.values() if not b.children and not b.pins]
            if not leaves:
                break
            for b in leaves:
                self._evict(b)
        self._budget = max(self.budget // 2, 0)
        return before - self.bytes

    def clear(self) -> None:
        self.root = Block((), None)
        self.bytes = self.blocks = 0
        self._lru.clear()


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
