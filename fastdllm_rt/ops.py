"""The operations the transformer calls, per backend.

``torch`` runs the PyTorch references that live beside the kernels (``fastdllm_kernels.<op>.reference``) and
works on any device; ``triton`` runs the Triton kernels on CUDA. Both expose the same methods, so a failure
tells at once whether the runtime or a kernel is wrong.
"""
from __future__ import annotations

import torch

from fastdllm_kernels.attention.reference import extend_attention_ref, sub_attention_ref
from fastdllm_kernels.rms_norm.reference import add_rms_norm_ref, rms_norm_ref
from fastdllm_kernels.rope.reference import rope_ref
from fastdllm_kernels.swiglu.reference import swiglu_ref

BACKENDS = ("torch", "triton")


class TorchOps:
    name = "torch"

    def rms_norm(self, x, weight, eps):
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return add_rms_norm_ref(x, residual, weight, eps)

    def rope(self, q, k, cos, sin):
        return rope_ref(q, cos, sin), rope_ref(k, cos, sin)

    def swiglu(self, gate_up):
        return swiglu_ref(gate_up)

    def write_kv(self, cache_k, cache_v, k, v, slots, index):
        """cache_*: [slots, Hkv, S, D]; k, v: [T, Hkv, D]; token t goes to (slots[t], :, index[t])."""
        cache_k[slots, :, index] = k.to(cache_k.dtype)
        cache_v[slots, :, index] = v.to(cache_v.dtype)

    def extend_attention(self, q, k, v, prefix_k, prefix_v, group, block_size, scale):
        return extend_attention_ref(q, k, v, prefix_k, prefix_v, group.slots, group.starts, group.cu, group.lens,
                                    block_size, scale)

    def sub_attention(self, q, prefix_k, prefix_v, block_k, block_v, group, scale):
        n = group.lens[0]
        return sub_attention_ref(q, prefix_k, prefix_v, block_k, block_v, group.slots, group.starts, n, scale)


def make_ops(backend: str, device: torch.device):
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError(f"backend='triton' needs a CUDA device, got {device}; use backend='torch' on CPU")
        from .ops_triton import TritonOps

        return TritonOps()
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
