"""The operations the transformer calls, per backend.

``torch`` runs on any device: norms, RoPE and SwiGLU are the PyTorch references that live beside the kernels
(``fastdllm_kernels.<op>.reference``); attention is ``scaled_dot_product_attention`` over padded rows, with the
padding and visibility built once per forward and shared by all layers (tests compare it with
``fastdllm_kernels.attention.reference``). ``triton`` runs the Triton kernels on CUDA. Both expose the same
methods, so a failure tells at once whether the runtime or a kernel is wrong.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastdllm_kernels.linear.reference import fused_linear_ref
from fastdllm_kernels.rms_norm.reference import add_rms_norm_ref, rms_norm_ref
from fastdllm_kernels.rope.reference import rope_ref
from fastdllm_kernels.select.reference import choice_stats_ref, token_logp_ref
from fastdllm_kernels.swiglu.reference import swiglu_ref

BACKENDS = ("torch", "triton")


class _ExtendPlan:
    """Layer-independent layout of one extend group: padded row indices and the key visibility mask."""

    def __init__(self, group, block_size, device):
        lens = group.lens
        R, n_max = len(lens), max(lens)
        self.uniform = len(set(lens)) == 1
        self.n_max = n_max
        self.s_max = int(group.starts.max()) if R else 0
        ar_n = torch.arange(n_max, device=device)
        cu = group.cu
        self.pad_idx = torch.minimum(cu[:-1, None] + ar_n[None, :], (cu[1:] - 1)[:, None])
        lens_t = torch.tensor(lens, device=device)
        self.valid = (ar_n[None, :] < lens_t[:, None]).reshape(-1)
        ar_s = torch.arange(self.s_max, device=device)
        starts = group.starts
        q_pos = starts[:, None] + ar_n[None, :]
        k_pos = torch.cat([ar_s[None, :].expand(R, -1), q_pos], dim=1)
        k_valid = torch.cat([ar_s[None, :] < starts[:, None], ar_n[None, :] < lens_t[:, None]], dim=1)
        allowed = k_valid[:, None, :] & (q_pos[:, :, None] // block_size >= k_pos[:, None, :] // block_size)
        # padded query rows see their own key so softmax stays finite; their outputs are dropped
        allowed |= ~(ar_n[None, :] < lens_t[:, None])[:, :, None] & (torch.arange(allowed.shape[-1], device=device)
                                                                     == self.s_max)[None, None, :]
        self.mask = None if bool(allowed.all()) else allowed[:, None]


class _SubPlan:
    def __init__(self, group, block_size, device):
        R = group.num_rows
        self.n = group.lens[0]
        self.p_max = int(group.starts.max()) if R else 0
        k_valid = torch.cat([torch.arange(self.p_max, device=device)[None, :] < group.starts[:, None],
                             torch.ones(R, block_size, dtype=torch.bool, device=device)], dim=1)
        self.mask = None if bool(k_valid.all()) else k_valid[:, None, None, :]


class AttnContext:
    """What every layer's attention needs about one forward, computed once: the groups it covers, token
    positions and slots, the contiguous token ranges that write the prefix / block caches, and the RoPE
    values (gathered per token for the PyTorch backend, whole tables for the Triton one)."""

    def __init__(self, model, batch, groups, T):
        self.groups = groups
        self.T = T
        self.positions = batch.positions[:T]
        self.slots = batch.token_slot[:T]
        self.block_size = model.config.bd_size
        pre = [g for g in groups if g.kind.writes_prefix]
        blk = [g for g in groups if g.kind.writes_block]
        self.prefix_range = (pre[0].tok_lo, pre[-1].tok_hi) if pre else None
        self.block_range = (blk[0].tok_lo, blk[-1].tok_hi) if blk else None


class TorchOps:
    name = "torch"

    def adopt(self, model):
        """Nothing to prepare: this backend runs the checkpoint's weights as they are."""

    def rms_norm(self, x, weight, eps):
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return add_rms_norm_ref(x, residual, weight, eps)

    def rope(self, q, k, cos, sin):
        return rope_ref(q, cos, sin), rope_ref(k, cos, sin)

    def swiglu(self, gate_up):
        return swiglu_ref(gate_up)

    def choice_stats(self, logits):
        """The sampler's greedy confidence, argmax and finiteness, packed [3, N] float64 (the original's
        softmax-then-max, exactly)."""
        return choice_stats_ref(logits)

    def token_logp(self, logits, tokens):
        """The scorer's log p(token), is-argmax and finiteness per row, packed [3, N] float64."""
        return token_logp_ref(logits, tokens)

    # the layer's matmuls with what surrounds them, composed exactly as the HF layer rounds (the reference of
    # the triton backend's fused linears)
    def norm_linear(self, x, norm, weight, bias=None, out_dtype=None):
        return fused_linear_ref(x, weight, norm_weight=norm.weight, eps=norm.eps, bias=bias, out_dtype=out_dtype)

    def qkv_projection(self, x, norm, proj):
        return self.norm_linear(x, norm, proj.weight, proj.bias)

    def linear_residual(self, a, weight, residual):
        return fused_linear_ref(a, weight, residual=residual)

    def norm_swiglu(self, x, norm, gate_up_weight):
        return fused_linear_ref(x, gate_up_weight, norm_weight=norm.weight, eps=norm.eps, swiglu=True)

    def prepare(self, model, batch, groups, T) -> AttnContext:
        ctx = AttnContext(model, batch, groups, T)
        ctx.cos, ctx.sin = model.rope_cos_sin(ctx.positions)
        return ctx

    @staticmethod
    def write_kv(cache_k, cache_v, k, v, slots, index):
        """cache_*: [slots, Hkv, S, D]; k, v: [T, Hkv, D]; token t goes to (slots[t], :, index[t])."""
        cache_k[slots, :, index] = k.to(cache_k.dtype)
        cache_v[slots, :, index] = v.to(cache_v.dtype)

    def attention(self, qkv, attn, ctx: AttnContext, caches, layer: int):
        q, k, v = attn.split_qkv(qkv)
        scale = attn.scale
        q, k = rope_ref(q, ctx.cos, ctx.sin), rope_ref(k, ctx.cos, ctx.sin)
        if ctx.prefix_range:
            lo, hi = ctx.prefix_range
            self.write_kv(caches.prefix_k[layer], caches.prefix_v[layer], k[lo:hi], v[lo:hi], ctx.slots[lo:hi],
                          ctx.positions[lo:hi])
        if ctx.block_range:
            lo, hi = ctx.block_range
            self.write_kv(caches.block_k[layer], caches.block_v[layer], k[lo:hi], v[lo:hi], ctx.slots[lo:hi],
                          ctx.positions[lo:hi] % ctx.block_size)
        out = torch.empty_like(q)
        for g in ctx.groups:
            sl = slice(g.tok_lo, g.tok_hi)
            if g.kind.extends:
                if caches is None:
                    pk = pv = k.new_zeros(1, k.shape[1], 0, k.shape[2])
                else:
                    pk, pv = caches.prefix_k[layer], caches.prefix_v[layer]
                out[sl] = self.extend_attention(q[sl], k[sl], v[sl], pk, pv, g, ctx.block_size, scale)
            else:
                out[sl] = self.sub_attention(q[sl], caches.prefix_k[layer], caches.prefix_v[layer],
                                             caches.block_k[layer], caches.block_v[layer], g, scale)
        return out

    @staticmethod
    def _plan(group, kind, block_size, device):
        plan = getattr(group, "_torch_plan", None)
        if plan is None:
            plan = (_ExtendPlan if kind == "extend" else _SubPlan)(group, block_size, device)
            group._torch_plan = plan
        return plan

    def extend_attention(self, q, k, v, prefix_k, prefix_v, group, block_size, scale):
        plan = self._plan(group, "extend", block_size, q.device)
        R = group.num_rows
        if plan.uniform:
            qp, kp, vp = (t.reshape(R, plan.n_max, *t.shape[1:]) for t in (q, k, v))
        else:
            qp, kp, vp = q[plan.pad_idx], k[plan.pad_idx], v[plan.pad_idx]
        if plan.s_max:
            kp = torch.cat([prefix_k[group.slots, :, :plan.s_max].transpose(1, 2).to(q.dtype), kp], dim=1)
            vp = torch.cat([prefix_v[group.slots, :, :plan.s_max].transpose(1, 2).to(q.dtype), vp], dim=1)
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                             attn_mask=plan.mask, scale=scale, enable_gqa=True).transpose(1, 2)
        out = out.reshape(R * plan.n_max, *q.shape[1:])
        return out if plan.uniform else out[plan.valid]

    def sub_attention(self, q, prefix_k, prefix_v, block_k, block_v, group, scale):
        plan = self._plan(group, "sub", block_k.shape[2], q.device)
        R = group.num_rows
        keys = torch.cat([prefix_k[group.slots, :, :plan.p_max], block_k[group.slots]], dim=2).to(q.dtype)
        vals = torch.cat([prefix_v[group.slots, :, :plan.p_max], block_v[group.slots]], dim=2).to(q.dtype)
        qp = q.reshape(R, plan.n, *q.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=plan.mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)


def make_ops(backend: str, device: torch.device):
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs a CUDA device, got {device}; use backend='torch' on CPU "
                             f"(or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
        from .ops_triton import TritonOps

        return TritonOps()
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
