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

    def tensors():
        for path in checkpoint_files(folder):
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, tuple(f.get_slice(key).get_shape()), (lambda f=f, key=key: f.get_tensor(key)), path

    fill(model, tensors(), dtype, device, where=folder)


def load_state_dict_into(model: torch.nn.Module, state_dict: dict, dtype: torch.dtype, device) -> None:
    """Materialise ``model`` (built on meta) from an in-memory state dict with the checkpoint's HF names."""
    items = ((k, tuple(v.shape), (lambda v=v: v), "state_dict") for k, v in state_dict.items())
    fill(model, items, dtype, torch.device(device), where="the state dict")


def fill(model: torch.nn.Module, tensors, dtype: torch.dtype, device: torch.device, where: str) -> None:
    """Allocate every parameter once on ``device`` and fill it from ``tensors`` (key, shape, getter, source);
    every key must be used and every parameter written."""
    cfg: ModelConfig = model.config
    slices = parameter_slices(cfg)
    params = dict(model.named_parameters())
    targets = {name: torch.empty(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    seen: set[str] = set()
    unexpected: list[str] = []
    tied_head = None
    for key, shape, get, source in tensors:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            tied_head = get()
            continue
        if key not in slices:
            unexpected.append(key)
            continue
        name, row, rows = slices[key]
        target = targets[name]
        expected = (rows,) + tuple(target.shape[1:])
        if shape != expected:
            raise CheckpointError(f"{key} in {os.path.basename(source)} has shape {shape}, but config.json "
                                  f"implies {expected}; the config and the weights do not belong together")
        target[row:row + rows].copy_(get())
        seen.add(key)
    missing = sorted(set(slices) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {_short(sorted(unexpected))}")
        raise CheckpointError(f"checkpoint {where} does not match its config.json: {'; '.join(parts)}. Use the "
                              f"config.json that came with these weights (Qwen2 tensor names are expected)")
    if tied_head is not None and not torch.equal(tied_head.to(device=device, dtype=dtype),
                                                 targets["embed_tokens.weight"]):
        raise CheckpointError(f"config.json says tie_word_embeddings=true but lm_head.weight differs from "
                              f"model.embed_tokens.weight in {where}; set tie_word_embeddings=false")
    model.load_state_dict(targets, assign=True, strict=True)


def _short(keys: list[str], limit: int = 8) -> str:
    if len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f" ... ({len(keys)} in all)"


def export_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our fused parameters -> the checkpoint's HF tensor names (the inverse of ``parameter_slices``)."""
    params = dict(model.named_parameters())
    out = {}
    for key, (name, row, rows) in parameter_slices(model.config).items():
        t = params[name].detach()[row:row + rows]
        out[key] = (t if dtype is None else t.to(dtype)).contiguous().cpu()
    return out


def save_checkpoint(model: torch.nn.Module, folder: str, dtype: torch.dtype = torch.bfloat16,
                    extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors in the released layout."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    cfg: ModelConfig = model.config
    raw = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": cfg.model_type, "bd_size": cfg.bd_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""), "use_cache": True,
    }
    raw.update(extra_config or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    save_file(export_state_dict(model, dtype), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
