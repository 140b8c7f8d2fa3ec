"""The Fast-dLLM v2 transformer (a Qwen2 decoder, spec §1) and its one unified forward.

``FastDLLM.forward(batch, caches, reuse)`` serves every forward kind of contract §1 for sampling and scoring
alike: the kinds differ only in where K/V are written and which keys each row sees (``batch.py``). A reuse
policy enters here and nowhere else: a skipped layer is not called at all for the rows that skip it, and its
output comes from the reuse cache (``reuse.py``).

Projections are stored fused (``qkv_proj``, ``gate_up_proj``); ``weights.py`` maps the checkpoint's HF names
(``self_attn.q_proj`` ...) onto their slices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdllm_kernels.rope.reference import rope_tables

from .batch import ForwardBatch
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.gain_folded = False            # set by ``fold_norm_gains``: the gain lives in the next weight


@torch.no_grad()
def fold_norm_gains(model: "FastDLLM") -> None:
    """Move each decoder layer's two RMSNorm gains into the projection that reads the normalised rows:
    ``rmsnorm(x; g) @ W.T == (x / rms(x)) @ (W * g).T``. The gains become ones, so every path stays exact
    (up to the rounding of ``W * g`` to the weight dtype); a backend that knows the gains are folded can then
    apply the row's ``1 / rms`` wherever it is cheapest - the triton backend does it inside the RoPE kernel
    and, per shape, the SwiGLU kernel, which saves a decode layer one or both of its RMSNorm kernels. The
    final norm before the LM head is left alone (the tied head is the embedding matrix). An exported
    state dict of a folded model is the same model with unit gains."""
    for layer in model.layers:
        for norm, proj in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                           (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
            if norm.gain_folded:
                continue
            w = proj.weight
            w.copy_((w.float() * norm.weight.float()[None, :]).to(w.dtype))
            norm.weight.fill_(1.0)
            norm.gain_folded = True


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=True)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def split_qkv(self, qkv):
        """[T, q + 2 kv] projection output -> q [T, Hq, D], k, v [T, Hkv, D] (views)."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (q.reshape(-1, self.num_heads, self.head_dim), k.reshape(-1, self.num_kv_heads, self.head_dim),
                v.reshape(-1, self.num_kv_heads, self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, attend, ops):
        """x: [T, hidden] residual stream in; returns the residual stream out. ``attend(qkv)`` applies RoPE,
        writes this layer's caches and attends; the backend's ``qkv_projection`` / ``linear_residual`` /
        ``norm_swiglu`` decide how much of the norms, bias, activation and residual adds fuse into the matmuls
        (``qkv`` is whatever the backend's ``qkv_projection`` returns and its ``attention`` takes)."""
        attn, mlp = self.self_attn, self.mlp
        qkv = ops.qkv_projection(x, self.input_layernorm, attn.qkv_proj)
        o = attend(qkv).reshape(x.shape[0], -1)
        x = ops.linear_residual(o, attn.o_proj.weight, x)
        h = ops.norm_swiglu(x, self.post_attention_layernorm, mlp.gate_up_proj.weight)
        return ops.linear_residual(h, mlp.down_proj.weight, x)


class FastDLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope = None
        # Layer evaluations as they happen (rows that entered each layer / rows that skipped it): the reuse
        # contract asks for counts taken where the work is, not inferred from the schedule.
        self.layer_rows_computed = [0] * cfg.num_hidden_layers
        self.layer_rows_skipped = [0] * cfg.num_hidden_layers

    # ---- helpers -----------------------------------------------------------------------------------------
    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def rope_tables(self, device):
        """cos, sin tables [max_positions, head_dim] in the activation dtype (built once per device/dtype)."""
        if self._rope is None or self._rope[0].device != device or self._rope[0].dtype != self.dtype:
            cfg = self.config
            self._rope = rope_tables(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, self.dtype, device)
        return self._rope

    def rope_cos_sin(self, positions):
        cos, sin = self.rope_tables(positions.device)
        return cos[positions], sin[positions]

    def logits(self, hidden):
        """Final norm + head on the selected hidden states only; fp32 logits."""
        return self.ops.norm_linear(hidden, self.norm, self.head_weight, out_dtype=torch.float32)

    def reset_counters(self):
        n = self.config.num_hidden_layers
        self.layer_rows_computed = [0] * n
        self.layer_rows_skipped = [0] * n

    # ---- the unified forward -----------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, caches, reuse=None) -> torch.Tensor:
        """Run one packed forward; return fp32 logits ``[len(batch.logits_index), vocab]``.

        ``caches``: ``Caches`` (may be None when every row is PLAIN with no prefix); ``reuse``: a
        ``ReuseRuntime`` applying the policy, or None."""
        x = self.embed_tokens(batch.tokens)
        T = batch.num_tokens
        n_compute = batch.skip_from
        compute_groups = [g for g in batch.groups if not g.skip]
        rows_all = sum(g.num_rows for g in batch.groups)
        rows_compute = sum(g.num_rows for g in compute_groups)
        ctx_all = self.ops.prepare(self, batch, batch.groups, T)
        ctx_compute = None
        # each token's place in its block: where the reuse cache keeps its layer outputs (computed once, not
        # once per layer - every op here is a kernel in a decode step's graph)
        offsets = batch.positions % self.config.bd_size if reuse is not None else None
        # In "output" mode a skipped layer's output is its cached output whatever its input, so along a run of
        # skipped layers only the last one's cache is read: ``pending`` names it until the skipping rows'
        # values are next needed (a computing layer, or the logits); the other skipped layers launch nothing.
        defer = reuse is not None and reuse.policy.mode == "output"
        pending = None
        for layer in self.layers:
            idx = layer.index
            skipping = reuse is not None and n_compute < T and reuse.skips(idx)
            if not skipping:
                if pending is not None:
                    x = self._take_replay(x, reuse, pending, batch, offsets, n_compute)
                    pending = None
                x_out = layer(x, self._attend_fn(ctx_all, caches, idx), self.ops)
                self.layer_rows_computed[idx] += rows_all
            else:
                if defer:
                    pending, replayed = idx, None
                else:
                    replayed = reuse.replay(idx, x[n_compute:], batch.token_slot[n_compute:], offsets[n_compute:])
                if n_compute:
                    if ctx_compute is None:
                        ctx_compute = self.ops.prepare(self, batch, compute_groups, n_compute)
                    x_out = torch.empty_like(x)       # deferred: the skipping rows are set before any read
                    x_out[:n_compute] = layer(x[:n_compute], self._attend_fn(ctx_compute, caches, idx), self.ops)
                    if replayed is not None:
                        x_out[n_compute:] = replayed
                    self.layer_rows_computed[idx] += rows_compute
                else:
                    # every row skips: the gather is the layer's output (deferred: x stands in until then)
                    x_out = x if replayed is None else replayed.to(x.dtype)
                self.layer_rows_skipped[idx] += rows_all - rows_compute
            if reuse is not None and batch.reuse_lo < n_compute:
                lo, hi = batch.reuse_lo, n_compute
                reuse.record(idx, x[lo:hi], x_out[lo:hi], batch.token_slot[lo:hi], offsets[lo:hi])
            x = x_out
        if pending is not None:
            x = self._take_replay(x, reuse, pending, batch, offsets, n_compute)
        if batch.logits_index.numel() == 0:
            return x.new_empty(0, self.config.vocab_size, dtype=torch.float32)
        return self.logits(x[batch.logits_index])

    @staticmethod
    def _take_replay(x, reuse, layer: int, batch, offsets, n_compute: int):
        """x with the skipping rows (from ``n_compute`` on) set to skipped ``layer``'s cached output."""
        cached = reuse.replay(layer, x[n_compute:], batch.token_slot[n_compute:], offsets[n_compute:])
        if n_compute == 0:
            return cached.to(x.dtype)
        x[n_compute:] = cached                 # x is the partial forward's own output tensor
        return x

    def _attend_fn(self, ctx, caches, layer: int):
        attn = self.layers[layer].self_attn
        return lambda qkv: self.ops.attention(qkv, attn, ctx, caches, layer)

    # ---- dense forward (training, references) ------------------------------------------------------------
    def forward_dense(self, input_ids, positions, allowed, logits_slice=None):
        """Full-sequence forward with an explicit boolean visibility mask, no caches.

        input_ids, positions: [B, N]; allowed: [B or 1, N, N] (True = may attend). Used by the trainer (the
        training mask of spec §2.1) and by tests; returns fp32 logits for ``logits_slice`` of the sequence."""
        B, N = input_ids.shape
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos_sin(positions.expand(B, N).reshape(-1))
        mask = allowed[:, None]
        for layer in self.layers:
            attn = layer.self_attn
            h = self.ops.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
            q, k, v = attn.split_qkv(F.linear(h.reshape(B * N, -1), attn.qkv_proj.weight, attn.qkv_proj.bias))
            q, k = self.ops.rope(q, k, cos, sin)
            q, k, v = (t.reshape(B, N, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            # expanded K/V heads let SDPA pick its memory-efficient kernel, which takes an arbitrary mask
            group = attn.num_heads // attn.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
            o = F.linear(o.transpose(1, 2).reshape(B, N, -1), attn.o_proj.weight)
            h, x = self.ops.add_rms_norm(o, x, layer.post_attention_layernorm.weight,
                                         layer.post_attention_layernorm.eps)
            x = x + F.linear(self.ops.swiglu(F.linear(h, layer.mlp.gate_up_proj.weight)), layer.mlp.down_proj.weight)
        if logits_slice is not None:
            x = x[:, logits_slice]
        return self.logits(x)


def block_causal_allowed(n: int, block_size: int, device=None, offset: int = 0) -> torch.Tensor:
    """[n, n] visibility of a plain forward over absolute positions offset..offset+n-1 (spec §2.2)."""
    pos = torch.arange(offset, offset + n, device=device)
    return (pos[:, None] // block_size) >= (pos[None, :] // block_size)
