"""Train a small Fast-dLLM-v2-style model on the synthetic task family, on CPU (tests) or one GPU.

    python -m fastdllm_rt.train --out runs/small --device cuda --minutes 8

writes a checkpoint in the released layout (config.json, model.safetensors in bf16, tokenizer files) plus
``training.json`` (command, loss curve, held-out accuracy), loadable with ``fastdllm_rt.load``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..config import ModelConfig
from ..model import FastDLLM
from ..torch_backend import TorchBackend
from ..tokenizer import Tokenizer
from ..weights import save_checkpoint
from .evaluate import evaluate
from .objective import diffusion_loss
from .synthetic import training_stream
from .tokenizer import build_tokenizer


@dataclass
class TrainConfig:
    out: str
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    layers: int = 28
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 512
    steps: int = 20000
    minutes: float = 0.0             # wall-clock budget (schedule fitted to it); 0 = run all steps
    batch_size: int = 256
    seq_len: int = 64                # static length: every synthetic example fits; lets the step be graphed
    cuda_graph: bool = True
    mix: str = ""                    # task weights, e.g. "arith=3,mc_letter=4"; empty = the default mixture
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    pool: int = 200_000              # pre-tokenised training examples
    eval_examples: int = 200
    log_every: int = 100
    pause_after: float = 0.0         # minutes of this invocation; then save train_state.pt and stop (for hosts
                                     # that cap a job's length); 0 = never
    pause_at_step: int = 0           # the same, at a step count (tests)
    resume: bool = False             # continue from <out>/train_state.pt exactly where a paused run stopped


def _init_(model: FastDLLM, layers: int) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            std = 0.02 / math.sqrt(2 * layers) if ("o_proj" in name or "down_proj" in name) else 0.02
            torch.nn.init.normal_(p, std=std)


def build(cfg: TrainConfig, tok: Tokenizer) -> FastDLLM:
    mc = ModelConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     head_dim=cfg.hidden // cfg.heads, rope_theta=10000.0, max_position_embeddings=4096,
                     tie_word_embeddings=True, bd_size=32, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = FastDLLM(mc, TorchBackend())
    _init_(model, cfg.layers)
    return model


class Batches:
    """Pre-tokenised training sequences packed into one tensor: prompt + response + stop, padded to the
    static length with the pad token, which is part of the response (the paper's "+pad" variant: the model
    learns to fill a block after its stop token)."""

    def __init__(self, tok: Tokenizer, cfg: TrainConfig):
        weights = {k: float(v) for k, v in (kv.split("=") for kv in cfg.mix.split(",") if kv)} or None
        stream = training_stream(cfg.seed, weights)
        examples = [next(stream) for _ in range(cfg.pool)]
        prompts = tok.encode_batch([e["prompt"] for e in examples])
        responses = tok.encode_batch([e["response"] for e in examples])
        stop, pad, L = tok.eos_token_id, tok.pad_token_id, cfg.seq_len
        rows, starts = [], []
        for p, r in zip(prompts, responses):
            p = p or [stop]                       # prose documents are conditioned on the stop token
            seq = p + r + [stop]
            if len(seq) <= L:
                rows.append(seq + [pad] * (L - len(seq)))
                starts.append(len(p))
        self.x = torch.tensor(rows, dtype=torch.long)
        self.resp = torch.arange(L)[None, :] >= torch.tensor(starts)[:, None]
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.batch_size = cfg.batch_size

    def sample(self, device):
        idx = torch.randint(0, self.x.shape[0], (self.batch_size,), generator=self.gen)
        x, resp = self.x[idx], self.resp[idx]
        if device.type == "cuda":
            x, resp = x.pin_memory(), resp.pin_memory()
        return x.to(device, non_blocking=True), resp.to(device, non_blocking=True)


def train(cfg: TrainConfig, argv=None) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    build_tokenizer(cfg.out, vocab_size=cfg.vocab, seed=cfg.seed)
    tok = Tokenizer(cfg.out)
    model = build(cfg, tok).to(device)
    mask_id = tok.token_to_id("|<MASK>|")
    data = Batches(tok, cfg)
    step_fn, set_lr, mode, opt = make_step(model, cfg, data, mask_id, device)
    print(f"training step: {mode}", flush=True)
    curve, step, t_train = [], 0, time.time()
    t_start, total = t_train, cfg.steps
    state_path = os.path.join(cfg.out, "train_state.pt")
    if cfg.resume:
        step, total, curve, spent, spent_train = _load_state(state_path, model, opt, data)
        t0, t_train = t0 - spent, t_train - spent_train
        print(f"resumed at step {step} of {total}", flush=True)
    model.train()
    while step < total:
        if ((cfg.pause_after and time.time() - t_start > cfg.pause_after * 60)
                or (cfg.pause_at_step and step >= cfg.pause_at_step)):
            _save_state(state_path, model, opt, data, step, total, curve, time.time() - t0, time.time() - t_train)
            print(f"paused at step {step} of {total}: continue with the same command plus --resume", flush=True)
            return {"paused_at": step, "total": total}
        if cfg.minutes and step == 30:
            # fit the schedule to the wall-clock budget: the cosine decay must end when time does
            per_step = (time.time() - t_train) / step
            left = cfg.minutes * 60 - (time.time() - t0) - 60     # a minute kept for evaluation and export
            total = max(step + 1, min(cfg.steps, step + int(left / per_step)))
            print(f"{per_step * 1e3:.1f} ms/step: {total} steps fit in {cfg.minutes} minutes", flush=True)
        set_lr(cfg.lr * min(1.0, (step + 1) / cfg.warmup)
               * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total))))
        loss = step_fn()
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            value = float(loss.detach())
            curve.append((step, value))
            print(f"step {step:5d}  loss {value:.4f}  {time.time() - t_train:6.1f}s", flush=True)
    train_seconds = time.time() - t_train
    with torch.no_grad():
        metrics = evaluate(model, tok, cfg.eval_examples) if cfg.eval_examples else {}
    save_checkpoint(model, cfg.out, dtype=torch.bfloat16)
    report = {"command": " ".join(["python -m fastdllm_rt.train"] + list(argv or [])), "config": asdict(cfg),
              "steps_done": step, "train_seconds": round(train_seconds, 1), "loss_curve": curve,
              "held_out_during_training": metrics,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    with open(os.path.join(cfg.out, "training.json"), "w") as f:
        json.dump(report, f, indent=2)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(json.dumps({k: report[k] for k in ("steps_done", "train_seconds", "held_out_during_training")}))
    return report


def _save_state(path, model, opt, data, step, total, curve, spent, spent_train):
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "opt": [{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                     for g in opt.param_groups for p in g["params"]],
             "data_rng": data.gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step, "total": total, "curve": curve,
             "spent": spent, "spent_train": spent_train}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load_state(path, model, opt, data):
    """Restore a paused run in place: the captured CUDA graph keeps pointing at the same tensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no paused run at {path}; start without --resume")
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state["model"][k])
        for saved, p in zip(state["opt"], (p for g in opt.param_groups for p in g["params"])):
            for k, v in saved.items():
                cur = opt.state[p].get(k)
                if torch.is_tensor(cur):
                    cur.copy_(v)
                elif torch.is_tensor(v) and (k != "step" or opt.defaults.get("capturable")):
                    opt.state[p][k] = v.to(p.device)
                else:
                    opt.state[p][k] = v
    data.gen.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])      # the noise on CPU; under CUDA-graph replay the noise stream
    #                                              is not restored, so a resumed GPU run is equal in distribution
    return state["step"], state["total"], [tuple(c) for c in state["curve"]], state["spent"], state["spent_train"]


def make_step(model, cfg: TrainConfig, data: Batches, mask_id: int, device):
    """(step() -> loss, set_lr(value), description, optimizer). On CUDA the whole step (forward, backward, clipping,
    AdamW) is captured once in a CUDA graph and replayed: the model is small, so eager launch overhead would
    otherwise dominate. Falls back to eager if capture fails."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    cuda = device.type == "cuda"
    lr = torch.tensor(cfg.lr, device=device) if cuda else cfg.lr
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), capturable=cuda, foreach=True)

    def set_lr(value):
        if cuda:
            lr.fill_(value)
        else:
            for g in opt.param_groups:
                g["lr"] = value

    def compute(x0, resp):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda else _nullcontext()
        with ctx:
            loss = diffusion_loss(model, x0, resp, mask_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return loss

    def eager():
        x0, resp = data.sample(device)
        opt.zero_grad(set_to_none=True)
        return compute(x0, resp)

    if not (cuda and cfg.cuda_graph):
        return eager, set_lr, "eager", opt
    try:
        static_x0, static_resp = data.sample(device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):                       # warm-up allocates grads and optimizer state
                opt.zero_grad(set_to_none=True)
                compute(static_x0, static_resp)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = compute(static_x0, static_resp)

        def replay():
            x0, resp = data.sample(device)
            static_x0.copy_(x0)
            static_resp.copy_(resp)
            graph.replay()
            return static_loss

        return replay, set_lr, "cuda graph", opt
    except Exception as e:  # noqa: BLE001 - any capture failure means: train eagerly
        print(f"CUDA graph capture failed ({type(e).__name__}: {e}); training eagerly", flush=True)
        torch.cuda.synchronize()
        return eager, set_lr, "eager (graph capture failed)", opt


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main(argv=None):
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    defaults = TrainConfig(out="")
    ap = argparse.ArgumentParser(prog="python -m fastdllm_rt.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, value in asdict(defaults).items():
        flag = "--" + field.replace("_", "-")
        if field == "out":
            ap.add_argument(flag, required=True, help="output checkpoint folder")
        elif isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    args = ap.parse_args(argv)
    return train(TrainConfig(**vars(args)), argv)
