"""safetensors checkpoint -> ``FastDLLM`` parameters, without allocating twice.

The model is built on the meta device; each parameter is then allocated once on the target device in the
target dtype and filled tensor by tensor straight from the (memory-mapped) checkpoint. Every checkpoint tensor
must be used and every parameter written, or ``CheckpointError`` names the keys.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig
from .errors import CheckpointError


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map; re-download the checkpoint")
        files = sorted(set(weight_map.values()))
        missing = [x for x in files if not os.path.isfile(os.path.join(folder, x))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {folder}; the download is "
                                  f"incomplete, fetch the missing shards")
        return [os.path.join(folder, x) for x in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}; this loader reads "
                          f"safetensors checkpoints only")


def parameter_slices(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF checkpoint name -> (our parameter name, row offset, row count) in the fused parameter."""
    hd = cfg.head_dim
    q, kv, f = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    out = {"model.embed_tokens.weight": ("embed_tokens.weight", 0, cfg.vocab_size),
           "model.norm.weight": ("norm.weight", 0, cfg.hidden_size)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", 0, cfg.vocab_size)
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for suffix in ("weight", "bias"):
            out[hf + f"self_attn.q_proj.{suffix}"] = (ours + f"self_attn.qkv_proj.{suffix}", 0, q)
            out[hf + f"self_attn.k_proj.{suffix}"] = (ours + f"self_attn.qkv_proj.{suffix}", q, kv)
            out[hf + f"self_attn.v_proj.{suffix}"] = (ours + f"self_attn.qkv_proj.{suffix}", q + kv, kv)
        out[hf + "self_attn.o_proj.weight"] = (ours + "self_attn.o_proj.weight", 0, cfg.hidden_size)
        out[hf + "mlp.gate_proj.weight"] = (ours + "mlp.gate_up_proj.weight", 0, f)
        out[hf + "mlp.up_proj.weight"] = (ours + "mlp.gate_up_proj.weight", f, f)
        out[hf + "mlp.down_proj.weight"] = (ours + "mlp.down_proj.weight", 0, cfg.hidden_size)
        out[hf + "input_layernorm.weight"] = (ours + "input_layernorm.weight", 0, cfg.hidden_size)
        out[hf + "post_attention_layernorm.weight"] = (ours + "post_attention_layernorm.weight", 0, cfg.hidden_size)
    return out


def load_into(model: torch.nn.Module, folder: str, dtype: torch.dtype, device: torch.device) -> None:
    """Materialise ``model`` (built on meta) from the checkpoint in ``folder``."""
    from safetensors import safe_open

    cfg: ModelConfig = model.config
    slices = parameter_slices(cfg)
    params = dict(model.named_parameters())
    targets = {name: torch.empty(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    seen: set[str] = set()
    unexpected: list[str] = []
    tied_head = None
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    tied_head = f.get_tensor(key)
                    continue
                if key not in slices:
                    unexpected.append(key)
                    continue
                name, row, rows = slices[key]
                target = targets[name]
                expected = (rows,) + tuple(target.shape[1:])
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected:
                    raise CheckpointError(f"{key} in {os.path.basename(path)} has shape {shape}, but config.json "
                                          f"implies {expected}; the config and the weights do not belong together")
                target[row:row + rows].copy_(f.get_tensor(key))
                seen.add(key)
    missing = sorted(set(slices) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_short(sorted(unexpected))}")
        raise CheckpointError(f"checkpoint {folder} does not match its config.json: {'; '.join(parts)}. Use the "
                              f"config.json that came with these weights (Qwen2 tensor names are expected)")
    if tied_head is not None and not torch.equal(tied_head.to(dtype), targets["embed_tokens.weight"].cpu()):
        raise CheckpointError(f"config.json says tie_word_embeddings=true but lm_head.weight differs from "
                              f"model.embed_tokens.weight in {folder}; set tie_word_embeddings=false")
    model.load_state_dict(targets, assign=True, strict=True)


def _short(keys: list[str], limit: int = 8) -> str:
    if len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f" ... ({len(keys)} in all)"
