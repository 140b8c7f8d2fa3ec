"""Preallocated caches, indexed by slot: prefix KV cache, block cache, reuse cache.

A *slot* is one sequence's home in every cache. Rows enter a batch by taking a slot and leave it by giving the
slot back, so finished rows leave without moving anyone's data, and shapes stay static for CUDA graphs.

* prefix K/V: ``[L, slots, Hkv, max_len, D]`` — RoPE'd keys/values of committed (clean) blocks;
* block K/V:  ``[L, slots, Hkv, block_size, D]`` — the current block's keys/values;
* reuse:      per policy layer ``[slots, block_size, hidden]`` — the layer's last computed output (``output``
  mode) or residual contribution (``delta`` mode) at each block offset (docs/design.md, Reuse policy).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import InputError


class Caches:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, dtype, device,
                 reuse_layers=(), reuse_mode: str | None = None):
        if max_len > config.max_position_embeddings:
            raise InputError(f"cache length {max_len} exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings}); shorten the input or max_new_tokens")
        L, H, D, block_size = config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.bd_size
        self.config = config
        self.num_slots = num_slots
        self.max_len = max_len
        self.block_size = block_size
        # Zeros, not empty: the PyTorch reference reads padded key ranges and multiplies them by zero weights.
        self.prefix_k = torch.zeros(L, num_slots, H, max_len, D, dtype=dtype, device=device)
        self.prefix_v = torch.zeros_like(self.prefix_k)
        self.block_k = torch.zeros(L, num_slots, H, block_size, D, dtype=dtype, device=device)
        self.block_v = torch.zeros_like(self.block_k)
        self.reuse_mode = reuse_mode
        self.reuse_layers = tuple(reuse_layers)
        self.reuse = {layer: torch.zeros(num_slots, block_size, config.hidden_size, dtype=dtype, device=device)
                      for layer in self.reuse_layers}
        self._free = list(range(num_slots - 1, -1, -1))

    def close(self) -> None:
        """Free the tensors now (captured graphs reference them: plain reference counting could keep them
        alive until the next garbage collection)."""
        self.prefix_k = self.prefix_v = self.block_k = self.block_v = None
        self.reuse = {}

    def reset(self) -> None:
        """Hand every slot back (the contents stay; every reader writes before it reads)."""
        self._free = list(range(self.num_slots - 1, -1, -1))

    def fits(self, num_slots: int, max_len: int, reuse_layers, reuse_mode) -> bool:
        return (num_slots <= self.num_slots and max_len <= self.max_len
                and tuple(reuse_layers) == self.reuse_layers and reuse_mode == self.reuse_mode)

    # ---- slots -------------------------------------------------------------------------------------------
    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} cache slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def fork(self, src: int, dst: int, prefix_len: int) -> None:
        """Make ``dst`` an exact copy of ``src``'s state: prefix ``[0, prefix_len)``, block and reuse caches."""
        self.prefix_k[:, dst, :, :prefix_len] = self.prefix_k[:, src, :, :prefix_len]
        self.prefix_v[:, dst, :, :prefix_len] = self.prefix_v[:, src, :, :prefix_len]
        self.block_k[:, dst] = self.block_k[:, src]
        self.block_v[:, dst] = self.block_v[:, src]
        for buf in self.reuse.values():
            buf[dst] = buf[src]

    def nbytes(self) -> int:
        tensors = [self.prefix_k, self.prefix_v, self.block_k, self.block_v, *self.reuse.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def bytes_per_slot(config: ModelConfig, max_len: int, dtype, reuse_layers: int = 0) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (max_len + config.bd_size)
        return elt * (kv + reuse_layers * config.bd_size * config.hidden_size)
