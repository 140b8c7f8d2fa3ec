"""The ``torch`` backend: the transformer in PyTorch, on any device.

Norms, RoPE, SwiGLU and the fused linears are the PyTorch references that live beside the kernels
(``fastdllm_kernels.<op>.reference``), composed as the Hugging Face layer rounds; attention is
``scaled_dot_product_attention`` over padded rows, with the padding and visibility of every group built once
per forward (``prepare``) and shared by all layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdllm_kernels.linear.reference import fused_linear_ref
from fastdllm_kernels.rope.reference import rope_ref
from fastdllm_kernels.select.reference import choice_stats_ref, token_logp_ref

from .batch import cache_write_ranges


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


class TorchAttnContext:
    """One forward's attention inputs: token positions and slots, the cache write ranges, the RoPE values
    gathered per token, and each group's padding plan (or the batch's explicit visibility)."""

    def __init__(self, model, batch, groups, num_tokens: int, caches):
        self.groups = groups
        self.caches = caches
        self.positions = batch.positions[:num_tokens]
        self.slots = batch.token_slot[:num_tokens]
        self.block_size = model.block_size
        self.prefix_range, self.block_range = cache_write_ranges(groups)
        self.cos, self.sin = model.rope_cos_sin(self.positions)
        self.visibility = batch.visibility
        dev = batch.tokens.device
        if self.visibility is not None:
            self.plans = [None] * len(groups)
        else:
            self.plans = [(_ExtendPlan if g.kind.extends else _SubPlan)(g, self.block_size, dev) for g in groups]


class TorchBackend:
    name = "torch"
    supports_cuda_graphs = False      # plans hold host values (lengths, masks) of the batch they were built for
    folds_norm_gains = False          # runs the checkpoint's weights as they are

    def choice_stats(self, logits):
        """The original's softmax-then-max, exactly."""
        return choice_stats_ref(logits)

    def token_logp(self, logits, tokens):
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

    def prepare(self, model, batch, groups, num_tokens, caches) -> TorchAttnContext:
        return TorchAttnContext(model, batch, groups, num_tokens, caches)

    @staticmethod
    def write_kv(cache_k, cache_v, k, v, slots, index):
        """cache_*: [slots, Hkv, S, D]; k, v: [T, Hkv, D]; token t goes to (slots[t], :, index[t])."""
        cache_k[slots, :, index] = k.to(cache_k.dtype)
        cache_v[slots, :, index] = v.to(cache_v.dtype)

    def attention(self, qkv, attn, ctx: TorchAttnContext):
        q, k, v = attn.split_qkv(qkv)
        scale, caches, layer = attn.scale, ctx.caches, attn.layer_index
        q, k = rope_ref(q, ctx.cos, ctx.sin), rope_ref(k, ctx.cos, ctx.sin)
        if ctx.visibility is not None:
            return self.masked_attention(q, k, v, ctx.groups[0], ctx.visibility, scale)
        if ctx.prefix_range:
            lo, hi = ctx.prefix_range
            self.write_kv(caches.prefix_k[layer], caches.prefix_v[layer], k[lo:hi], v[lo:hi], ctx.slots[lo:hi],
                          ctx.positions[lo:hi])
        if ctx.block_range:
            lo, hi = ctx.block_range
            self.write_kv(caches.block_k[layer], caches.block_v[layer], k[lo:hi], v[lo:hi], ctx.slots[lo:hi],
                          ctx.positions[lo:hi] % ctx.block_size)
        out = torch.empty_like(q)
        for g, plan in zip(ctx.groups, ctx.plans):
            sl = slice(g.tok_lo, g.tok_hi)
            if g.kind.extends:
                if caches is None:
                    pk = pv = k.new_zeros(1, k.shape[1], 0, k.shape[2])
                else:
                    pk, pv = caches.prefix_k[layer], caches.prefix_v[layer]
                out[sl] = self.extend_attention(q[sl], k[sl], v[sl], pk, pv, g, plan, scale)
            else:
                out[sl] = self.sub_attention(q[sl], caches.prefix_k[layer], caches.prefix_v[layer],
                                             caches.block_k[layer], caches.block_v[layer], g, plan, scale)
        return out

    @staticmethod
    def masked_attention(q, k, v, group, visibility, scale):
        """Equal-length rows under an explicit [rows or 1, n, n] visibility mask (training)."""
        R, n = group.num_rows, group.lens[0]
        qp, kp, vp = (t.reshape(R, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        # expanded K/V heads let SDPA pick its memory-efficient kernel, which takes an arbitrary mask
        rep = q.shape[1] // k.shape[1]
        kp, vp = kp.repeat_interleave(rep, dim=1), vp.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=visibility[:, None], scale=scale)
        return out.transpose(1, 2).reshape(q.shape)

    @staticmethod
    def extend_attention(q, k, v, prefix_k, prefix_v, group, plan, scale):
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

    @staticmethod
    def sub_attention(q, prefix_k, prefix_v, block_k, block_v, group, plan, scale):
        R = group.num_rows
        keys = torch.cat([prefix_k[group.slots, :, :plan.p_max], block_k[group.slots]], dim=2).to(q.dtype)
        vals = torch.cat([prefix_v[group.slots, :, :plan.p_max], block_v[group.slots]], dim=2).to(q.dtype)
        qp = q.reshape(R, plan.n, *q.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=plan.mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

