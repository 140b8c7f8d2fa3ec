"""Tiny random-weight checkpoints in the released layout (config.json with the released fields,
model.safetensors with Qwen2 tensor names), written by tests into tmp folders.

Weights are shaped like the oracle's: a scaled output head so that confidences vary and threshold unmasking
is really exercised."""
import json
import os

import torch
from safetensors.torch import save_file

RELEASED_7B_FIELDS = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                 "AutoModel": "modeling.Fast_dLLM_QwenModel",
                 "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
    "bd_size": 32, "bos_token_id": 151643, "conplemenrary_mask": True, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "Fast_dLLM_Qwen",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151645,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
RELEASED_1_5B_FIELDS = dict(RELEASED_7B_FIELDS, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                            num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936,
                            max_window_layers=21)
RELEASED_1_5B_FIELDS.pop("conplemenrary_mask")


def tiny_config(*, layers=28, hidden=64, heads=4, kv_heads=2, inter=128, vocab=512, tied=False, max_pos=4096,
                **extra):
    cfg = dict(RELEASED_7B_FIELDS, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
               num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tied,
               max_position_embeddings=max_pos, bos_token_id=vocab - 3, eos_token_id=vocab - 2,
               pad_token_id=vocab - 2, torch_dtype="float32", max_window_layers=layers,
               layer_types=["full_attention"] * layers)
    cfg.update(extra)
    return cfg


def random_state_dict(cfg, seed=0, head_scale=6.0):
    g = torch.Generator().manual_seed(seed)
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": rnd(V, d, std=1.0), "model.norm.weight": 1 + rnd(d, std=0.1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + rnd(d, std=0.1),
            p + "post_attention_layernorm.weight": 1 + rnd(d, std=0.1),
            p + "self_attn.q_proj.weight": rnd(q, d, std=0.5 / d ** 0.5 * 4),
            p + "self_attn.q_proj.bias": rnd(q, std=0.1),
            p + "self_attn.k_proj.weight": rnd(kv, d, std=0.5 / d ** 0.5 * 4),
            p + "self_attn.k_proj.bias": rnd(kv, std=0.1),
            p + "self_attn.v_proj.weight": rnd(kv, d, std=1 / d ** 0.5),
            p + "self_attn.v_proj.bias": rnd(kv, std=0.1),
            p + "self_attn.o_proj.weight": rnd(d, q, std=0.5 / q ** 0.5),
            p + "mlp.gate_proj.weight": rnd(f, d, std=1 / d ** 0.5),
            p + "mlp.up_proj.weight": rnd(f, d, std=1 / d ** 0.5),
            p + "mlp.down_proj.weight": rnd(d, f, std=0.5 / f ** 0.5),
        })
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(V, d, std=head_scale / d ** 0.5)
    else:
        sd["model.embed_tokens.weight"] *= head_scale / d ** 0.5 / 1.0
    return sd


def write_checkpoint(folder, cfg, sd=None, *, seed=0, shards=1):
    os.makedirs(folder, exist_ok=True)
    sd = random_state_dict(cfg, seed) if sd is None else sd
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        save_file(sd, os.path.join(folder, "model.safetensors"))
    else:
        keys = sorted(sd)
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[s::shards]}
            save_file(part, os.path.join(folder, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return folder


def make_checkpoint(folder, *, seed=0, tied=False, shards=1, **cfg_kwargs):
    cfg = tiny_config(tied=tied, **cfg_kwargs)
    return write_checkpoint(folder, cfg, seed=seed, shards=shards)


TINY_IDS = dict(mask_token_id=511, stop_token_id=510, pad_token_id=0)
