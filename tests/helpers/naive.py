"""An independent reference, written from the algorithm's description (docs/design.md) for the tests: a from-scratch Qwen2 forward in plain
PyTorch (HF tensor names, no fusion, no caches) plus step-by-step versions of the algorithms.

Nothing here imports fastdllm_rt: it reads config.json and the safetensors directly."""
import json
import math
import os

import torch
from safetensors.torch import load_file


class NaiveQwen:
    def __init__(self, folder, dtype=torch.float32):
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        self.sd = {k: v.to(dtype) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
        c = self.cfg
        self.L, self.H, self.Hkv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
        self.d = c["hidden_size"] // self.H
        self.eps, self.theta, self.bs = c["rms_norm_eps"], c["rope_theta"], c["bd_size"]
        self.head = self.sd.get("lm_head.weight", self.sd["model.embed_tokens.weight"])
        self.dtype = dtype

    def _norm(self, x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rope(self, x, pos):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2).float() / self.d))
        fr = pos.float()[:, None] * inv[None]
        emb = torch.cat([fr, fr], -1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        rot = torch.cat([-x[..., self.d // 2:], x[..., :self.d // 2]], -1)
        return x * cos + rot * sin

    def forward(self, ids, pos, kv_fn):
        """ids, pos: [n]. kv_fn(layer, k, v) -> (keys [m, Hkv, d], values, allowed [n, m]) decides what the
        n queries attend to at that layer. Returns (logits [n, V] fp32, per-layer (k, v) of the n tokens)."""
        sd, x = self.sd, self.sd["model.embed_tokens.weight"][torch.as_tensor(ids)]
        pos = torch.as_tensor(pos)
        kvs = []
        for l in range(self.L):
            p = f"model.layers.{l}."
            h = self._norm(x, sd[p + "input_layernorm.weight"])
            q = (h @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]).view(-1, self.H, self.d)
            k = (h @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]).view(-1, self.Hkv, self.d)
            v = (h @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]).view(-1, self.Hkv, self.d)
            q, k = self._rope(q, pos), self._rope(k, pos)
            kvs.append((k, v))
            K, V, allowed = kv_fn(l, k, v)
            G = self.H // self.Hkv
            Kx, Vx = K.repeat_interleave(G, dim=1), V.repeat_interleave(G, dim=1)
            s = torch.einsum("nhd,mhd->hnm", q.float(), Kx.float()) / math.sqrt(self.d)
            s = s.masked_fill(~allowed[None], float("-inf"))
            o = torch.einsum("hnm,mhd->nhd", s.softmax(-1), Vx.float()).to(x.dtype).reshape(len(ids), -1)
            x = x + o @ sd[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, sd[p + "post_attention_layernorm.weight"])
            g = h @ sd[p + "mlp.gate_proj.weight"].T
            u = h @ sd[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
        return (self._norm(x, sd["model.norm.weight"]) @ self.head.T).float(), kvs

    # ---- forward kinds, by definition -------------------------------------------------------------------
    def plain(self, ids):
        """Block-causal forward over absolute positions 0..n-1."""
        n = len(ids)
        pos = torch.arange(n)
        allowed = (pos[:, None] // self.bs) >= (pos[None, :] // self.bs)
        return self.forward(ids, pos, lambda l, k, v: (k, v, allowed))

    def sub_block(self, prefix_ids, stale_block_kv, sub_ids, r):
        """Sub-block forward: 8 queries at block offset r; keys = prefix K/V + the block's K/V where
        positions [r, r+8) are fresh and the other positions are ``stale_block_kv`` (per layer)."""
        P = len(prefix_ids)
        _, prefix_kv = self.plain(prefix_ids) if P else (None, None)
        n = len(sub_ids)

        def kv_fn(l, k, v):
            bk, bv = (t.clone() for t in stale_block_kv[l])
            bk[r:r + n], bv[r:r + n] = k, v
            if P:
                bk, bv = torch.cat([prefix_kv[l][0], bk]), torch.cat([prefix_kv[l][1], bv])
            return bk, bv, torch.ones(n, bk.shape[0], dtype=torch.bool)

        return self.forward(sub_ids, torch.arange(P + r, P + r + n), kv_fn)


def shift(logits):
    """Right-shift along the sequence, duplicating index 0."""
    return torch.cat([logits[:1], logits[:-1]], 0)


def reference_generate(m: NaiveQwen, prompt, num_blocks, threshold, use_block_cache, mask, stop,
                       trace=None):
    """Batch-1 greedy block-diffusion generation written step by step from the original algorithm, with the 32-token
    prompt fixed (prefill whenever the prompt holds a whole block). Every forward is recomputed from scratch
    (plain forward of prefix + block, or the sub-block definition). Returns (generated tokens cut after the
    first stop, forward counts)."""
    bs = m.bs
    x = list(prompt)
    P = len(x)
    counts = {"commit": 0, "full_block": 0, "sub_block": 0}
    first_block = P // bs
    if P >= bs:
        counts["commit"] += 1          # the prefill forward
        if P % bs == 0:
            logits, _ = m.plain(x)
            x.append(int(logits[-1].argmax()))
    for b in range(first_block, first_block + num_blocks):
        start = b * bs
        x = x + [mask] * (start + bs - len(x))
        stale = None
        for s in range(bs // 8):
            while any(t == mask for t in x[start + 8 * s:start + 8 * s + 8]):
                if use_block_cache and stale is not None and x[start + 8 * s] != mask:
                    sub_logits, _ = m.sub_block(x[:start], stale, x[start + 8 * s:start + 8 * s + 8], 8 * s)
                    window = shift(sub_logits)
                    counts["sub_block"] += 1
                else:
                    logits, kvs = m.plain(x[:start + bs])
                    stale = [(k[start:], v[start:]) for k, v in kvs]
                    window = shift(logits[start:])[8 * s:8 * s + 8]
                    counts["full_block"] += 1
                if trace is not None:
                    trace(window)
                probs = window.softmax(-1)
                conf, x0 = probs.max(-1)
                masked = torch.tensor([t == mask for t in x[start + 8 * s:start + 8 * s + 8]])
                conf = torch.where(masked, conf, torch.tensor(float("-inf")))
                chosen = (conf > threshold) & masked
                chosen[int(conf.argmax())] = True
                for j in range(8):
                    if chosen[j]:
                        x[start + 8 * s + j] = int(x0[j])
        gen = x[P:]
        if stop in gen:
            return gen[:gen.index(stop) + 1], counts
        logits, _ = m.plain(x[:start + bs])
        counts["commit"] += 1
        x.append(int(logits[-1].argmax()))
    gen = x[P:]
    return (gen[:gen.index(stop) + 1] if stop in gen else gen), counts


def brute_force_chain_rule(m: NaiveQwen, ctx, cont, mask):
    """sum_t log p(cont[t] | ctx, cont[:t]) where the prediction for position p is read from a plain forward
    of everything known up to p, with the rest of p's block masked (the oracle's definition)."""
    total, greedy = 0.0, True
    for t in range(len(cont)):
        known = list(ctx) + list(cont[:t])
        p = len(known)
        end = (p // m.bs + 1) * m.bs
        ids = known + [mask] * (end - p)
        logits, _ = m.plain(ids)
        lp = shift(logits)[p].log_softmax(-1)
        total += float(lp[cont[t]])
        greedy &= int(lp.argmax()) == cont[t]
    return total, greedy


def original_first_token(m: NaiveQwen, ctx, cont, mask, eos):
    """The original evaluation's log-likelihood."""
    seq = list(ctx) + list(cont)
    n = len(seq)
    x = seq + [mask] * ((n // m.bs + 1) * m.bs - n)
    x[len(ctx)] = mask
    x[n] = eos
    logits, _ = m.plain(x)
    return float(shift(logits)[len(ctx)].log_softmax(-1)[cont[0]])
