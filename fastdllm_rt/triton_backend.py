"""The ``triton`` backend: the transformer in Triton kernels (``fastdllm_kernels``).

It runs models whose RMSNorm gains are folded into the QKV and gate/up weights (``model.fold_norm_gains``, done
by the loader because ``folds_norm_gains`` is set): the QKV projection then multiplies the raw residual stream and the RoPE kernel, which reads q, k, v anyway,
scales each token by its input row's 1/rms and adds the bias, so attention needs no RMSNorm kernel; the
gate/up projection's 1/rms comes from whichever the linear sweep measured fastest for the shape - the fused
linear's own K loop, a gain-less norm kernel before it, or the SwiGLU kernel after cuBLAS. Decode steps (at most ``fastdllm_kernels.linear.configs.FUSED_MAX_TOKENS`` tokens) are
weight-bound: their four matmuls per layer go through ``fastdllm_kernels.linear.dispatch.linear`` (per shape,
the strategy measured fastest on the GPU:
``fused_linear`` kernels that stream the weight once with SwiGLU and the residual adds in their epilogues,
or cuBLAS), so a layer is QKV, one RoPE + KV-cache-write kernel, attention (decode kernel for full-block,
sub-block and commit rows; block-causal kernel for windows that span blocks), O, gate/up (+ SwiGLU), down.
Where the tuning table says so (``pick_qkv_rope``, e.g. 8-token sub-block steps), ``qkv_projection`` only
defers, and ``attention`` runs the QKV projection with the RoPE kernel's work in its epilogue
(``fastdllm_kernels.linear.qkv_rope``) - one kernel fewer a layer.
Larger forwards (prefill, scoring) are compute-bound and use cuBLAS with the same RoPE / SwiGLU kernels and
cuBLAS's residual-add epilogue.

Everything ``prepare`` derives from a batch lives on the device and depends on host values only through the
batch's layout, so a forward can be captured in a CUDA graph and replayed with new tokens and lengths.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastdllm_kernels.attention.kernel import decode_attention, prefill_attention
from fastdllm_kernels.linear.configs import device_name, pick_qkv_rope
from fastdllm_kernels.linear.dispatch import linear
from fastdllm_kernels.linear.qkv_rope import qkv_rope_write
from fastdllm_kernels.rope.kernel import rope_write
from fastdllm_kernels.select.kernel import choice_stats, token_logp

from .batch import Kind, cache_write_ranges

_DEST = {Kind.PLAIN: 0, Kind.PREFILL: 1, Kind.COMMIT: 1, Kind.FULL: 2, Kind.SUB: 2}


class RawQKV(NamedTuple):
    """The QKV projection of the un-normalised layer input, before its row scale and bias (``attention``
    finishes it inside the RoPE kernel) - or, where the projection fuses the RoPE kernel's work (decode
    steps, ``pick_qkv_rope``), not yet run: ``raw`` is None and ``attention`` runs ``qkv_rope_write``."""
    raw: torch.Tensor | None       # [T, (Hq + 2 Hkv) D]
    norm_input: torch.Tensor       # [T, hidden]: the rows whose 1/rms scales it
    bias: torch.Tensor | None
    eps: float
    weight: torch.Tensor | None = None                  # set when ``raw`` is deferred


def _require_folded(norm):
    if not norm.gain_folded:
        raise RuntimeError("the triton backend runs models whose RMSNorm gains are folded into the next "
                           "projection: call fastdllm_rt.model.fold_norm_gains(model) after loading the weights "
                           "(fastdllm_rt.load does)")


class TritonAttnContext:
    """One forward's attention inputs, all on the device: token positions and slots, each token's cache
    destination (0 none, 1 prefix, 2 block), the RoPE tables, and the kernel to launch per group."""

    def __init__(self, model, batch, groups, num_tokens: int, caches):
        if batch.visibility is not None:
            raise ValueError("the triton backend runs block-causal rows only; an explicit visibility mask "
                             "(training) runs on backend='torch'")
        dev = batch.tokens.device
        self.groups, self.caches = groups, caches
        self.positions = batch.positions[:num_tokens]
        self.slots = batch.token_slot[:num_tokens]
        self.block_size = model.block_size
        self.prefix_range, self.block_range = cache_write_ranges(groups)
        self.cos_table, self.sin_table = model.rope_tables(dev)
        self.dest = torch.cat([torch.full((g.tok_hi - g.tok_lo,), _DEST[g.kind], dtype=torch.int32, device=dev)
                               for g in groups]) if groups else torch.zeros(0, dtype=torch.int32, device=dev)
        self.launch = []
        for g in groups:
            n = g.lens[0]
            uniform = all(x == n for x in g.lens)
            if g.kind in (Kind.FULL, Kind.SUB, Kind.COMMIT) and uniform:
                plen = g.starts + n if g.kind is Kind.COMMIT else g.starts
                tail = torch.full_like(g.slots, 0 if g.kind is Kind.COMMIT else 1)
                self.launch.append(("decode", g, (g.slots, plen, tail, g.cu[:-1]), n))
            else:
                self.launch.append(("prefill", g, (g.slots, g.starts, g.cu), max(g.lens)))


class TritonBackend:
    name = "triton"
    folds_norm_gains = True

    def __init__(self, device: torch.device):
        # CUDA graphs need a GPU; the interpreter (CPU) runs the same code eagerly
        self.supports_cuda_graphs = device.type == "cuda"
        # the interpreter runs programs one after another: plan for few of them there
        self._num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 2
        self._dummy = {}

    # the layer's matmuls: ``linear`` picks per shape (fused kernels for decode steps, cuBLAS above them)
    def norm_linear(self, x, norm, weight, bias=None, out_dtype=None):
        return linear(x, weight, norm_weight=norm.weight, eps=norm.eps, bias=bias, out_dtype=out_dtype,
                      num_sms=self._num_sms)

    def linear_residual(self, a, weight, residual):
        return linear(a, weight, residual=residual, num_sms=self._num_sms)

    def qkv_projection(self, x, norm, proj) -> RawQKV:
        _require_folded(norm)
        strategy, _ = pick_qkv_rope(x.shape[0], proj.weight.shape[0], x.shape[1], self._num_sms,
                                    device_name(x.device))
        if strategy == "fused":
            return RawQKV(None, x, proj.bias, norm.eps, proj.weight)
        return RawQKV(linear(x, proj.weight, num_sms=self._num_sms), x, proj.bias, norm.eps)

    def norm_swiglu(self, x, norm, gate_up_weight):
        _require_folded(norm)
        return linear(x, gate_up_weight, row_rms=True, eps=norm.eps, swiglu=True, num_sms=self._num_sms)

    def choice_stats(self, logits):
        """The sampler's greedy confidence, argmax and finiteness, packed [3, N] float64: one split pass over
        the vocabulary (kernels/select), not PyTorch's one-SM-per-row softmax."""
        return choice_stats(logits)

    def token_logp(self, logits, tokens):
        """The scorer's log p(token), is-argmax and finiteness per row, packed [3, N] float64 (the row's
        log-sum-exp and argmax from the same split pass)."""
        return token_logp(logits, tokens)

    def prepare(self, model, batch, groups, num_tokens, caches) -> TritonAttnContext:
        return TritonAttnContext(model, batch, groups, num_tokens, caches)

    def _dummy_cache(self, like, n_kv_heads: int, head_dim: int):
        """A cache that plain forwards (no cache writes, ``dest`` 0) pass to kernels that take one."""
        key = (like.device, like.dtype, n_kv_heads, head_dim)
        if key not in self._dummy:
            self._dummy[key] = torch.zeros(1, n_kv_heads, 32, head_dim, dtype=like.dtype, device=like.device)
        return self._dummy[key]

    def attention(self, qkv: RawQKV, attn, ctx: TritonAttnContext):
        scale, caches, layer = attn.scale, ctx.caches, attn.layer_index
        if caches is None:
            pk = pv = bk = bv = self._dummy_cache(qkv.norm_input, attn.num_kv_heads, attn.head_dim)
        else:
            pk, pv = caches.prefix_k[layer], caches.prefix_v[layer]
            bk, bv = caches.block_k[layer], caches.block_v[layer]
        if qkv.raw is None:                         # one kernel: projection, row scale, bias, RoPE, cache writes
            finished = qkv_rope_write(qkv.norm_input, qkv.weight, qkv.bias, qkv.eps, attn.num_heads,
                                      attn.num_kv_heads, ctx.cos_table, ctx.sin_table, ctx.positions, ctx.dest,
                                      ctx.slots, pk, pv, bk, bv, num_sms=self._num_sms)
            q, k, v = attn.split_qkv(finished)
        else:
            q, k, v = attn.split_qkv(qkv.raw)
            rope_write(q, k, v, ctx.cos_table, ctx.sin_table, ctx.positions, ctx.dest, ctx.slots, pk, pv, bk, bv,
                       norm_input=qkv.norm_input, bias=qkv.bias, eps=qkv.eps)
        out = torch.empty_like(q)
        for kind, g, args, n in ctx.launch:
            sl = slice(g.tok_lo, g.tok_hi)
            if kind == "decode":
                decode_attention(q[sl], pk, pv, bk, bv, *args, n_q=n, scale=scale, out=out[sl],
                                 num_sms=self._num_sms)
            else:
                out[sl] = prefill_attention(q[sl], k[sl], v[sl], pk, pv, *args, max_len=n, scale=scale,
                                            block_size=ctx.block_size)
        return out
