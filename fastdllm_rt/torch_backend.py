"""The ``torch`` backend: the transformer in PyTorch, on any device.

Norms, RoPE, SwiGLU and the fused linears are the PyTorch references that live beside the kernels
(``fastdllm_kernels.<op>.reference``), composed as the Hugging Face layer rounds; attention is
``scaled_dot_product_attention`` per window geometry and query block, over exactly the keys each block sees
(no padding, no mask), so a row's result never depends on its batch; each group's layout is built once per
forward (``prepare``) and shared by all layers.
"""
from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from fastdllm_kernels.linear.reference import fused_linear_ref
from fastdllm_kernels.rope.reference import rope_ref
from fastdllm_kernels.select.reference import choice_stats_ref, token_logp_ref

from .batch import cache_write_ranges


# CPU BLAS computes a product's rows by different paths (and, threaded, with different splits of the reduction)
# depending on how many rows it gets, so a row's result would depend on the rows beside it. On the CPU every
# matmul therefore runs in tiles of exactly this many rows (the last padded): a row's bits are then the same
# whatever forward it is in - what makes prefix-cached K/V exact (docs/design.md, Prefix cache).
GEMM_ROWS = 64


def _fixed_row_tiles(x, residual, compute):
    """``compute(x_tile, residual_tile)`` over tiles of ``GEMM_ROWS`` rows on the CPU; in one call elsewhere."""
    n = x.shape[0]
    if x.device.type != "cpu" or n == 0:
        return compute(x, residual)
    pad = -n % GEMM_ROWS

    def tiles(t):
        if pad:
            t = torch.cat([t, t[-1:].expand(pad, *t.shape[1:])])
        return t.split(GEMM_ROWS)

    res = tiles(residual) if residual is not None else [None] * ((n + pad) // GEMM_ROWS)
    return torch.cat([compute(a, r) for a, r in zip(tiles(x), res)])[:n]


def _by_geometry(keys, offsets, length, device):
    """[(key, row indices, the indices of their tokens)] for rows sharing ``key`` (row i's tokens start at
    ``offsets[i]``; ``length(key)`` tokens a row), in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [(key, torch.tensor(rows, device=device),
             torch.tensor([offsets[i] + j for i in rows for j in range(length(key))], device=device))
            for key, rows in groups.items()]


class _ExtendPlan:
    """Layer-independent layout of one extend group: rows grouped by window geometry (start, length), with the
    token indices of each geometry's rows (host values, read once per forward)."""

    def __init__(self, group, block_size, device):
        self.block_size = block_size
        offs = [0, *accumulate(group.lens)]     # from the host's lengths: ``group.cu`` lives on the device
        self.shapes = _by_geometry(list(zip(group.starts.tolist(), group.lens)), offs, lambda key: key[1], device)


class _SubPlan:
    """Rows of one sub-block group, grouped by block start (they see the same number of prefix keys)."""

    def __init__(self, group, block_size, device):
        self.n = n = group.lens[0]
        starts = group.starts.tolist()
        self.by_start = _by_geometry(starts, [i * n for i in range(len(starts))], lambda key: n, device)


class TorchAttnContext:
    """One forward's attention inputs: token positions and slots, the cache write ranges, the RoPE values
    gathered per token, and each group's attention plan (or the batch's explicit visibility)."""

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
        return _fixed_row_tiles(x, None, lambda t, _: fused_linear_ref(t, weight, norm_weight=norm.weight,
                                                                       eps=norm.eps, bias=bias, out_dtype=out_dtype))

    def qkv_projection(self, x, norm, proj):
        return self.norm_linear(x, norm, proj.weight, proj.bias)

    def linear_residual(self, a, weight, residual):
        return _fixed_row_tiles(a, residual, lambda t, r: fused_linear_ref(t, weight, residual=r))

    def norm_swiglu(self, x, norm, gate_up_weight):
        return _fixed_row_tiles(x, None, lambda t, _: fused_linear_ref(t, gate_up_weight, norm_weight=norm.weight,
                                                                       eps=norm.eps, swiglu=True))

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
        """Rows with equal window geometry (start, length) attend together, one query block at a time, over
        exactly the keys that block sees (no padding, no mask). Every query's result then depends only on
        its row's keys, not on which rows share the forward or how a prefix was split into forwards - so
        K/V served from the prefix cache give the same bits as K/V computed in place."""
        bs = plan.block_size
        out = torch.empty_like(q)
        for (s, n), rows, tok in plan.shapes:
            R = len(rows)
            qr, kr, vr = (t[tok].reshape(R, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            if s:
                slots = group.slots[rows]
                kr = torch.cat([prefix_k[slots, :, :s].to(q.dtype), kr], dim=2)
                vr = torch.cat([prefix_v[slots, :, :s].to(q.dtype), vr], dim=2)
            res = torch.empty_like(qr)
            lo = 0
            while lo < n:
                hi = min(lo + bs - (s + lo) % bs, n)
                res[:, :, lo:hi] = F.scaled_dot_product_attention(qr[:, :, lo:hi], kr[:, :, :s + hi],
                                                                  vr[:, :, :s + hi], scale=scale, enable_gqa=True)
                lo = hi
            out[tok] = res.transpose(1, 2).reshape(R * n, *q.shape[1:])
        return out

    @staticmethod
    def sub_attention(q, prefix_k, prefix_v, block_k, block_v, group, plan, scale):
        """Per block start, the rows' queries over their prefix and block keys (no padding, no mask)."""
        out = torch.empty_like(q)
        n = plan.n
        for p, rows, tok in plan.by_start:
            slots, R = group.slots[rows], rows.numel()
            keys = torch.cat([prefix_k[slots, :, :p], block_k[slots]], dim=2).to(q.dtype)
            vals = torch.cat([prefix_v[slots, :, :p], block_v[slots]], dim=2).to(q.dtype)
            qp = q[tok].reshape(R, n, *q.shape[1:]).transpose(1, 2)
            res = F.scaled_dot_product_attention(qp, keys, vals, scale=scale, enable_gqa=True)
            out[tok] = res.transpose(1, 2).reshape(R * n, *q.shape[1:])
        return out
