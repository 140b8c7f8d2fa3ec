"""Block-diffusion attention in plain PyTorch (fp32 math, result cast to the query dtype).

Two forms, matching the two shapes of query window the runtime forwards:

* ``extend``: each row's window starts on a block boundary ``start`` (or at 0) and may span several blocks
  (prefill, commit, full-block, plain forward). Keys are the row's prefix cache ``[0, start)`` followed by the
  window's own keys; visibility is block-causal over absolute positions, ``q // block_size >= k // block_size``.
* ``sub``: each row's 8-query window sits inside the current block; keys are the prefix cache ``[0, plen)``
  followed by the whole block cache (which already holds this window's fresh K/V). No mask.

Caches are ``[slots, Hkv, S, D]`` (prefix) and ``[slots, Hkv, block_size, D]`` (block); queries and new keys are
packed ``[T, H, D]`` with row offsets ``cu`` (``cu[r]:cu[r+1]`` are row r's tokens).
"""
import torch


def attention_core_ref(q, k, v, allowed, scale):
    """q [R, n, Hq, D], k/v [R, S, Hkv, D], allowed [R, n, S] -> [R, n, Hq, D] in q's dtype (GQA by grouping)."""
    R, n, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.float().reshape(R, n, Hkv, Hq // Hkv, D)
    scores = torch.einsum("rnhgd,rshd->rhgns", qg, k.float()) * scale
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("rhgns,rshd->rnhgd", probs, v.float())
    return out.reshape(R, n, Hq, D).to(q.dtype)


def _pad_rows(x, cu, lens, n_max):
    """Packed [T, ...] -> [R, n_max, ...] (rows shorter than n_max repeat their last token; masked later)."""
    idx = cu[:-1, None] + torch.arange(n_max, device=x.device)[None, :]
    idx = torch.minimum(idx, (cu[1:] - 1)[:, None])
    return x[idx]


def _unpad_rows(x, lens):
    return torch.cat([x[r, :n] for r, n in enumerate(lens)], dim=0)


def extend_attention_ref(q, k, v, prefix_k, prefix_v, slots, starts, cu, lens, block_size, scale):
    """q [T, Hq, D], k/v [T, Hkv, D] (this window's keys); starts [R] first absolute position of each row."""
    if not lens:
        return q.new_empty(q.shape)
    dev = q.device
    n_max = max(lens)
    s_max = int(starts.max()) if starts.numel() else 0
    lens_t = torch.tensor(lens, device=dev)
    qp, kp_own, vp_own = (_pad_rows(t, cu, lens, n_max) for t in (q, k, v))
    kp = prefix_k[slots, :, :s_max].transpose(1, 2)
    vp = prefix_v[slots, :, :s_max].transpose(1, 2)
    keys = torch.cat([kp.to(q.dtype), kp_own], dim=1)
    vals = torch.cat([vp.to(q.dtype), vp_own], dim=1)
    ar_n = torch.arange(n_max, device=dev)
    ar_s = torch.arange(s_max, device=dev)
    q_pos = starts[:, None] + ar_n[None, :]
    k_pos = torch.cat([ar_s[None, :].expand(len(lens), -1), q_pos], dim=1)
    k_valid = torch.cat([ar_s[None, :] < starts[:, None], ar_n[None, :] < lens_t[:, None]], dim=1)
    allowed = k_valid[:, None, :] & (q_pos[:, :, None] // block_size >= k_pos[:, None, :] // block_size)
    out = attention_core_ref(qp, keys, vals, allowed, scale)
    return _unpad_rows(out, lens)


def decode_attention_ref(q, prefix_k, prefix_v, block_k, block_v, slots, prefix_lens, has_tail, q_starts, n_q, scale):
    """The decode kinds by definition: row r's n_q queries (packed at q_starts[r]) attend, unmasked, to its
    prefix cache [0, prefix_lens[r]) followed by its whole block cache when has_tail[r]."""
    out = torch.zeros_like(q)
    for r in range(slots.numel()):
        s, L, lo = int(slots[r]), int(prefix_lens[r]), int(q_starts[r])
        keys, vals = [prefix_k[s, :, :L]], [prefix_v[s, :, :L]]
        if int(has_tail[r]):
            keys.append(block_k[s])
            vals.append(block_v[s])
        kk = torch.cat(keys, dim=1).transpose(0, 1)[None]
        vv = torch.cat(vals, dim=1).transpose(0, 1)[None]
        qq = q[lo:lo + n_q][None]
        allowed = torch.ones(1, n_q, kk.shape[1], dtype=torch.bool, device=q.device)
        out[lo:lo + n_q] = attention_core_ref(qq, kk.to(q.dtype), vv.to(q.dtype), allowed, scale)[0]
    return out
