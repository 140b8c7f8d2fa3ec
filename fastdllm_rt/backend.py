"""The interface between the transformer and the code that computes it.

``model.py`` writes each layer's forward once against ``Backend``; ``torch_backend.TorchBackend`` computes it
with the PyTorch references that live beside the kernels (any device), ``triton_backend.TritonBackend`` with
the Triton kernels (CUDA, or Triton's interpreter). One switch, ``backend="torch" | "triton"``, runs the whole
model on either, so a failure says at once whether the runtime or a kernel is wrong.

How much of the norms, bias, activation and residual adds fuse into the matmuls is the backend's choice:
``qkv_projection`` returns whatever its ``attention`` takes.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import torch

BACKENDS = ("torch", "triton")


class Backend(Protocol):
    name: str
    supports_cuda_graphs: bool      # a forward depends on host values only through the batch's layout
    folds_norm_gains: bool          # runs models whose RMSNorm gains live in the next projection's weight

    def prepare(self, model, batch, groups, num_tokens: int, caches) -> Any:
        """What every layer's attention needs about the first ``num_tokens`` tokens of ``batch`` (covered by
        ``groups``), computed once per forward."""

    def qkv_projection(self, x: torch.Tensor, norm, proj) -> Any:
        """The layer's input norm and QKV projection (or as much of it as the backend fuses elsewhere)."""

    def attention(self, qkv, attn, ctx) -> torch.Tensor:
        """RoPE, this layer's cache writes and attention; returns [T, heads, head_dim]."""

    def linear_residual(self, a: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + a @ weight.T``."""

    def norm_swiglu(self, x: torch.Tensor, norm, gate_up_weight: torch.Tensor) -> torch.Tensor:
        """``swiglu(rmsnorm(x) @ gate_up_weight.T)``."""

    def norm_linear(self, x: torch.Tensor, norm, weight: torch.Tensor, bias=None, out_dtype=None) -> torch.Tensor:
        """``rmsnorm(x) @ weight.T + bias`` (the LM head)."""

    def choice_stats(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampler's greedy confidence, argmax and finiteness per row, packed [3, N] float64."""

    def token_logp(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The scorer's log p(token), is-argmax and finiteness per row, packed [3, N] float64."""


def make_backend(name: str, device: torch.device) -> Backend:
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs a CUDA device, got {device}; use backend='torch' on CPU "
                             f"(or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
        from .triton_backend import TritonBackend

        return TritonBackend(device)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
