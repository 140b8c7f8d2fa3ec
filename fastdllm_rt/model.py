"""The Fast-dLLM v2 transformer (a Qwen2 decoder) and its one forward.

``FastDLLM.forward(batch, caches, reuse)`` serves every forward kind (docs/design.md, Forward kinds) for
sampling, scoring and training alike: the kinds differ only in where K/V are written and which keys each row
sees (``batch.py``). Each layer's math is written here once, against the ``Backend`` interface
(``backend.py``). A reuse policy enters here and nowhere else: a skipped layer is not called at all for the rows
that skip it, and its output comes from the reuse cache (``reuse.py``).

Projections are stored fused (``qkv_proj``, ``gate_up_proj``); ``weights.py`` maps the checkpoint's HF names
(``self_attn.q_proj`` ...) onto their slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastdllm_kernels.rope.reference import rope_tables

from .backend import Backend
from .batch import ForwardBatch, dense_batch
from .config import ModelConfig


class RMSNorm(nn.Module):
    """The gain of an RMSNorm. It has no forward of its own: the backend applies it inside the projection that
    reads the normalised rows (``norm_linear``, ``qkv_projection``, ``norm_swiglu``)."""

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
    apply the row's ``1 / rms`` wherever it is cheapest (the triton backend does it inside the RoPE kernel
    and, per shape, the SwiGLU kernel). The final norm before the LM head is left alone (the tied head is the
    embedding matrix). An exported state dict of a folded model is the same model with unit gains."""
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
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index      # which layer's caches it writes and reads
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=True)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x, norm: RMSNorm, backend: Backend, ctx):
        """Residual stream in, residual stream out: ``x + o_proj(attention(rope(qkv_proj(norm(x)))))``."""
        qkv = backend.qkv_projection(x, norm, self.qkv_proj)
        o = backend.attention(qkv, self, ctx).reshape(x.shape[0], -1)
        return backend.linear_residual(o, self.o_proj.weight, x)

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

    def forward(self, x, norm: RMSNorm, backend: Backend):
        """Residual stream in, residual stream out: ``x + down(swiglu(gate_up(norm(x))))``."""
        h = backend.norm_swiglu(x, norm, self.gate_up_proj.weight)
        return backend.linear_residual(h, self.down_proj.weight, x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, backend: Backend, ctx):
        """x: [T, hidden] residual stream in; returns the residual stream out."""
        x = self.self_attn(x, self.input_layernorm, backend, ctx)
        return self.mlp(x, self.post_attention_layernorm, backend)


@dataclass
class ForwardOutput:
    """One forward's fp32 logits and its layer evaluations: rows that entered each layer / skipped it."""
    logits: torch.Tensor
    layers_computed: list[int]
    layers_skipped: list[int]


class FastDLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.config = cfg
        self.backend = backend
        self.block_size = cfg.bd_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope = None

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
        return self.backend.norm_linear(hidden, self.norm, self.head_weight, out_dtype=torch.float32)

    def forward(self, batch: ForwardBatch, caches=None, reuse=None) -> ForwardOutput:
        """Run one packed forward: fp32 logits ``[len(batch.logits_index), vocab]`` and its layer counts.

        ``caches``: ``Caches`` (None when every row is PLAIN); ``reuse``: a ``ReuseRuntime`` or None. Rows
        that skip the policy's layers form the batch's tail ``[skip_from, T)``; the others compute."""
        backend, n_layers = self.backend, self.config.num_hidden_layers
        computed, skipped = [0] * n_layers, [0] * n_layers
        x = self.embed_tokens(batch.tokens)
        T = batch.num_tokens
        n_compute = batch.skip_from
        compute_groups = [g for g in batch.groups if not g.skip]
        rows_all = sum(g.num_rows for g in batch.groups)
        rows_compute = sum(g.num_rows for g in compute_groups)
        ctx_all = backend.prepare(self, batch, batch.groups, T, caches)
        ctx_compute = None
        # each token's place in its block: where the reuse cache keeps its layer outputs (computed once, not
        # once per layer - every op here is a kernel in a decode step's graph)
        offsets = batch.positions % self.block_size if reuse is not None else None
        # In "output" mode a skipped layer's output is its cached output whatever its input, so along a run of
        # skipped layers only the last one's cache is read: ``pending`` names it until the skipping rows'
        # values are next needed (a computing layer, or the logits); the other skipped layers launch nothing.
        defer = reuse is not None and reuse.mode == "output"
        pending = None
        for layer in self.layers:
            idx = layer.index
            skipping = reuse is not None and n_compute < T and reuse.skips(idx)
            if not skipping:
                if pending is not None:
                    x = self._take_replay(x, reuse, pending, batch, offsets, n_compute)
                    pending = None
                x_out = layer(x, backend, ctx_all)
                computed[idx] += rows_all
            else:
                if defer:
                    pending, replayed = idx, None
                else:
                    replayed = reuse.replay(idx, x[n_compute:], batch.token_slot[n_compute:], offsets[n_compute:])
                if n_compute:
                    if ctx_compute is None:
                        ctx_compute = backend.prepare(self, batch, compute_groups, n_compute, caches)
                    x_out = torch.empty_like(x)       # deferred: the skipping rows are set before any read
                    x_out[:n_compute] = layer(x[:n_compute], backend, ctx_compute)
                    if replayed is not None:
                        x_out[n_compute:] = replayed
                    computed[idx] += rows_compute
                else:
                    # every row skips: the gather is the layer's output (deferred: x stands in until then)
                    x_out = x if replayed is None else replayed.to(x.dtype)
                skipped[idx] += rows_all - rows_compute
            if reuse is not None and batch.reuse_lo < n_compute:
                lo, hi = batch.reuse_lo, n_compute
                reuse.record(idx, x[lo:hi], x_out[lo:hi], batch.token_slot[lo:hi], offsets[lo:hi])
            x = x_out
        if pending is not None:
            x = self._take_replay(x, reuse, pending, batch, offsets, n_compute)
        if batch.logits_index.numel() == 0:
            logits = x.new_empty(0, self.config.vocab_size, dtype=torch.float32)
        else:
            logits = self.logits(x[batch.logits_index])
        return ForwardOutput(logits, computed, skipped)

    @staticmethod
    def _take_replay(x, reuse, layer: int, batch, offsets, n_compute: int):
        """x with the skipping rows (from ``n_compute`` on) set to skipped ``layer``'s cached output."""
        cached = reuse.replay(layer, x[n_compute:], batch.token_slot[n_compute:], offsets[n_compute:])
        if n_compute == 0:
            return cached.to(x.dtype)
        x[n_compute:] = cached                 # x is the partial forward's own output tensor
        return x

    def forward_dense(self, input_ids, positions, allowed, logits_slice=None):
        """The one forward over B equal-length rows with an explicit visibility mask and no caches.

        input_ids: [B, N]; positions: [B or 1, N]; allowed: [B or 1, N, N] (True = may attend). Used by the
        training objective and by tests; returns fp32 logits [B, n, vocab] for ``logits_slice`` of each row."""
        B, N = input_ids.shape
        batch = dense_batch(input_ids, positions, allowed, logits_slice or slice(None))
        return self.forward(batch).logits.reshape(B, -1, self.config.vocab_size)


def block_causal_allowed(n: int, block_size: int, device=None, offset: int = 0) -> torch.Tensor:
    """[n, n] visibility of a plain forward over absolute positions offset..offset+n-1."""
    pos = torch.arange(offset, offset + n, device=device)
    return (pos[:, None] // block_size) >= (pos[None, :] // block_size)
