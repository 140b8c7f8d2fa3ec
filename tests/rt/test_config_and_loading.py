"""Config parsing, weight loading, token ids, dtype choice and every loading error."""
import json
import os

import pytest
import torch

import fastdllm_rt
from fastdllm_rt import CheckpointError, ConfigError, HubError, ModelConfig
from fastdllm_rt.loader import build_model, pick_dtype
from tests.helpers.checkpoints import (RELEASED_1_5B_FIELDS, RELEASED_7B_FIELDS, TINY_IDS, make_checkpoint,
                                       random_state_dict, tiny_config, write_checkpoint)


def _count(cfg_dict):
    model = build_model(ModelConfig.from_dict(cfg_dict))
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def test_released_configs_have_the_published_parameter_counts_on_meta():
    assert round(_count(RELEASED_1_5B_FIELDS) / 1e9, 2) == 1.54
    assert round(_count(RELEASED_7B_FIELDS) / 1e9, 2) == 7.62
    assert ModelConfig.from_dict(RELEASED_7B_FIELDS).num_parameters() == _count(RELEASED_7B_FIELDS)


def test_released_fields_parse_and_head_dim_is_derived_only_when_absent():
    cfg = ModelConfig.from_dict(RELEASED_7B_FIELDS)
    assert (cfg.head_dim, cfg.group_size, cfg.bd_size, cfg.tie_word_embeddings) == (128, 7, 32, False)
    assert cfg.rope_theta == 1e6 and cfg.eos_token_id == 151645
    assert ModelConfig.from_dict(dict(RELEASED_7B_FIELDS, head_dim=64)).head_dim == 64
    with pytest.raises(dataclasses_frozen_error()):
        cfg.hidden_size = 1


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_plain_qwen2_and_transformers5_rope_parameters_configs():
    qwen = {k: v for k, v in RELEASED_1_5B_FIELDS.items() if k not in ("bd_size",)}
    qwen["model_type"] = "qwen2"
    qwen.pop("rope_theta")
    qwen["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg = ModelConfig.from_dict(qwen)
    assert cfg.bd_size == 32 and cfg.rope_theta == 500000.0 and cfg.model_type == "qwen2"


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"bd_size": 12}, "bd_size"),
])
def test_config_errors_name_the_field(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_dict(dict(RELEASED_7B_FIELDS, **change))


def test_missing_config_field_is_named():
    raw = dict(RELEASED_7B_FIELDS)
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_checkpoint_in_released_layout_loads(tmp_path, tied):
    folder = make_checkpoint(str(tmp_path / "ck"), tied=tied)
    rt = fastdllm_rt.load(folder, device="cpu", **TINY_IDS)       # on CPU: fp32 and the torch backend by default
    assert (rt.model.lm_head is None) == tied
    assert rt.dtype == torch.float32 and rt.device.type == "cpu" and rt.backend == "torch"
    sd = random_state_dict(tiny_config(tied=tied))
    w = rt.model.layers[3].self_attn.qkv_proj.weight
    assert torch.equal(w[:64], sd["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(w[64 + 32:], sd["model.layers.3.self_attn.v_proj.weight"])
    assert torch.equal(rt.model.head_weight, sd["model.embed_tokens.weight" if tied else "lm_head.weight"])


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    one = fastdllm_rt.load(make_checkpoint(str(tmp_path / "a"), seed=3), **TINY_IDS)
    many = fastdllm_rt.load(make_checkpoint(str(tmp_path / "b"), seed=3, shards=4), **TINY_IDS)
    for (n, p), (_, q) in zip(one.model.named_parameters(), many.model.named_parameters()):
        assert torch.equal(p, q), n


def _broken(tmp_path, mutate):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    mutate(sd)
    return write_checkpoint(str(tmp_path / "bad"), cfg, sd)


def test_missing_tensor_is_named(tmp_path):
    folder = _broken(tmp_path, lambda sd: sd.pop("model.layers.7.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.7.mlp.up_proj.weight"):
        fastdllm_rt.load(folder, **TINY_IDS)


def test_unexpected_tensor_is_named(tmp_path):
    folder = _broken(tmp_path, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary.inv_freq", torch.ones(4)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*rotary.inv_freq"):
        fastdllm_rt.load(folder, **TINY_IDS)


def test_wrong_shape_is_named(tmp_path):
    folder = _broken(tmp_path, lambda sd: sd.__setitem__("model.layers.2.self_attn.k_proj.weight",
                                                         torch.zeros(48, 64)))
    with pytest.raises(CheckpointError, match=r"model.layers.2.self_attn.k_proj.weight .* shape \(48, 64\).*\(32, 64\)"):
        fastdllm_rt.load(folder, **TINY_IDS)


def test_missing_config_json_and_missing_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        fastdllm_rt.load(str(empty))
    (empty / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        fastdllm_rt.load(str(empty), **TINY_IDS)


def test_hub_id_offline_without_a_local_copy(tmp_path, monkeypatch):
    """A real huggingface_hub call with HF_HUB_OFFLINE=1 and an empty HF_HOME: no network is touched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import importlib

    import huggingface_hub.constants as constants
    importlib.reload(constants)
    try:
        with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 and Efficient-Large-Model/Fast_dLLM_v2_7B is not in"):
            fastdllm_rt.load("Efficient-Large-Model/Fast_dLLM_v2_7B")
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_hub_id_offline_with_a_cached_copy_loads(tmp_path, monkeypatch):
    """HF_HOME with a snapshot in the hub cache layout resolves offline to that snapshot."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--acme--tiny-dllm"
    snap = repo / "snapshots" / ("0" * 40)
    make_checkpoint(str(snap))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    import importlib

    import huggingface_hub.constants as constants
    importlib.reload(constants)
    try:
        rt = fastdllm_rt.load("acme/tiny-dllm", **TINY_IDS)
        assert os.path.realpath(rt.folder) == os.path.realpath(str(snap))
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_gated_repo_without_access_is_explained(monkeypatch):
    """Simulated hub: snapshot_download raises the gated-repository error huggingface_hub raises."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        # Built without __init__: its signature (an httpx response) differs across huggingface_hub versions.
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "403 Client Error: access to model acme/gated is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(HubError, match="gated repository.*Request access at https://huggingface.co/acme/gated.*HF_TOKEN"):
        fastdllm_rt.load("acme/gated")


def test_a_missing_folder_is_said_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=r"no folder \./no/such/folder/here \(.* has no 'no'\); `model` is a local"):
        fastdllm_rt.load("./no/such/folder/here")


def test_a_mistyped_relative_path_names_the_nearest_folder_and_never_asks_the_hub(tmp_path, monkeypatch):
    """Defect: `fastdllm_rt/small_modl` (a typo of a folder here) went to the hub and was reported as "could
    not reach the hub ... check the network"."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a name that looks like a local folder was sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    make_checkpoint(str(tmp_path / "fastdllm_rt" / "small_model"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=r"no folder fastdllm_rt/small_modl .*did you mean fastdllm_rt/small_model\?"):
        fastdllm_rt.load("fastdllm_rt/small_modl")
    (tmp_path / "modelz").mkdir()
    with pytest.raises(HubError, match=r"no folder \./models/tiny .*did you mean modelz\?"):
        fastdllm_rt.load("./models/tiny")


def test_a_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **k: asked.append(repo_id) or make_checkpoint(str(tmp_path / "snap")))
    monkeypatch.chdir(tmp_path)
    rt = fastdllm_rt.load("acme/tiny-dllm", **TINY_IDS)
    assert asked == ["acme/tiny-dllm"] and rt.folder == str(tmp_path / "snap")


def test_token_ids_come_from_caller_then_config_then_released_values(tiny_untied):
    rt = fastdllm_rt.load(tiny_untied, mask_token_id=511, pad_token_id=0)
    assert rt.token_ids.stop == 510                     # config.json eos_token_id
    with pytest.raises(ConfigError, match="mask token id 151665 is outside the model's vocabulary"):
        fastdllm_rt.load(tiny_untied)                    # released mask id does not fit a 512-token vocabulary
    with pytest.raises(ConfigError, match="mask and stop"):
        fastdllm_rt.load(tiny_untied, mask_token_id=510, pad_token_id=0)


def test_dtype_is_chosen_by_device_unless_given():
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        pick_dtype("int8", torch.device("cpu"))


def test_backend_follows_the_device_and_what_the_kernels_support(tiny28):
    import dataclasses

    from fastdllm_rt.config import ModelConfig
    from fastdllm_rt.loader import pick_backend
    narrow = ModelConfig.from_file(tiny28)                 # 8-wide heads: below tl.dot's 16
    wide = dataclasses.replace(narrow, hidden_size=64, head_dim=16)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_backend(None, cpu, wide) == "torch"
    assert pick_backend("auto", cuda, wide) == "triton"
    assert pick_backend("auto", cuda, narrow) == "torch"     # runs, rather than failing in a Triton compile
    assert pick_backend("torch", cuda, narrow) == "torch"
    with pytest.raises(ConfigError, match="head_dim 8 .*power of two >= 16.*use backend='torch'"):
        pick_backend("triton", cuda, narrow)
    with pytest.raises(ConfigError, match="head_dim 24"):
        pick_backend("triton", cuda, dataclasses.replace(wide, head_dim=24))


def test_loading_in_bf16_keeps_the_checkpoint_values(tiny_untied):
    rt = fastdllm_rt.load(tiny_untied, dtype="bf16", **TINY_IDS)
    assert rt.dtype == torch.bfloat16
    assert rt.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_cuda_request_without_cuda_is_explained(tiny_untied):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        fastdllm_rt.load(tiny_untied, device="cuda", **TINY_IDS)
