"""Shared pieces of the GPU benchmarks: records, timers, ceilings, random weights at the released shapes and
the Hugging Face baseline (transformers Qwen2 modules with a block-causal mask, eager attention).

Every measurement is one JSON line (``record``) carrying the GPU, versions and commit, as STYLE.md asks."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers.checkpoints import RELEASED_1_5B_FIELDS, RELEASED_7B_FIELDS  # noqa: E402

SHAPES = {"7B": RELEASED_7B_FIELDS, "1.5B": RELEASED_1_5B_FIELDS,
          # for smoke-testing the scripts on a CPU
          "tiny": dict(RELEASED_1_5B_FIELDS, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=151936, num_hidden_layers=28)}
# the released checkpoints' mask / stop / pad token ids (random weights have no tokenizer to read them from)
RELEASED_IDS = dict(mask_token_id=151665, stop_token_id=151645, pad_token_id=151643)
# (query heads, KV heads) of the released models' attention
ATTENTION_HEADS = {name: (SHAPES[name]["num_attention_heads"], SHAPES[name]["num_key_value_heads"])
                   for name in ("7B", "1.5B")}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS = os.environ.get("FASTDLLM_BENCH_OUT", os.path.join(os.path.dirname(__file__), "results"))


def env_info() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        commit = None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit}


_ENV = None


def record(file: str, **row) -> dict:
    """Append one measurement to ``RESULTS/<file>.jsonl`` and return it."""
    global _ENV
    if _ENV is None:
        _ENV = env_info()
    row = {**row, **_ENV, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, file + ".jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def cuda_time(fn, warmup: int = 5, iters: int = 30) -> dict:
    """Median / p20 / p80 of ``fn`` in milliseconds, timed with CUDA events (host clock on CPU), after
    warm-up."""
    import time

    for _ in range(warmup):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"p50_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def graph_time(fn, reps: int = 20, iters: int = 20) -> dict:
    """GPU time of ``fn`` without host launch overhead: ``reps`` calls captured in one CUDA graph, the replay
    timed with CUDA events, divided by ``reps``. Falls back to ``cuda_time`` off the GPU."""
    if DEVICE != "cuda":
        return cuda_time(fn)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    t = cuda_time(g.replay, warmup=3, iters=iters)
    return {k: v / reps for k, v in t.items()}


def copies_beyond_l2(nbytes: int, at_least: int = 1, at_most: int | None = None) -> int:
    """How many copies of an input of ``nbytes`` together exceed this GPU's L2 three times over, so that timing
    calls that rotate through them reads every input from HBM (``at_least`` off the GPU, where there is no L2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if DEVICE == "cuda" else 0
    n = max(at_least, -(-3 * l2 // nbytes))
    return n if at_most is None else min(at_most, n)


def rotating_graph_ms(body, copies: int, reps: int = 3, iters: int = 20, capture_body=None) -> float:
    """Median GPU time (ms) of one ``body(i)`` call: ``reps`` passes over ``i = 0 .. copies - 1`` captured in one
    CUDA graph, so a call's inputs were last touched ``copies - 1`` calls earlier - pick ``copies`` so that the
    rotating inputs exceed the L2 and every call reads from HBM. ``capture_body`` (default ``body``) is what
    the graph records; ``body`` alone warms up eagerly first."""
    for i in range(copies):
        body(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for i in range(copies):
                (capture_body or body)(i)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2] / (reps * copies)


def kernel_times_us(fn, calls: int) -> dict:
    """Mean device time per call (us) of each GPU kernel ``fn`` launches, by kernel name: ``calls`` calls under
    the torch profiler (the runtime's ``fastdllm:`` ranges and memory copies left out). Warm ``fn`` up first."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key and not ev.key.startswith("fastdllm:") and "Memcpy" not in ev.key \
                and "ProfilerStep" not in ev.key:
            times[ev.key] = t / calls
    return times


@contextlib.contextmanager
def env(**values: str):
    """Environment variables set for the block (kernels read FASTDLLM_* at each launch, so CUDA graphs captured
    inside follow them), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_pdl(fn):
    """``fn`` run (and captured) with programmatic dependent launch on (kernels/launch.py; off by default)."""
    def call():
        with env(FASTDLLM_PDL="1"):
            return fn()
    return call


def decode_attention_inputs(hq: int, hkv: int, prefix: int, queries: int, D: int = 128, dtype=torch.bfloat16):
    """One row's decode-attention call at batch 1: q [queries, hq, D], a prefix cache holding ``prefix`` keys
    (64 spare), the 32-key block cache, and the row metadata (slot 0, prefix length, block cache on, queries
    from token 0) - the argument order of ``decode_attention``."""
    pk = torch.randn(1, hkv, prefix + 64, D, device=DEVICE, dtype=dtype)
    pv, bk = torch.randn_like(pk), torch.randn(1, hkv, 32, D, device=DEVICE, dtype=dtype)
    bv = torch.randn_like(bk)
    q = torch.randn(queries, hq, D, device=DEVICE, dtype=dtype)
    meta = [torch.zeros(1, dtype=torch.long, device=DEVICE), torch.tensor([prefix], device=DEVICE),
            torch.ones(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)]
    return q, pk, pv, bk, bv, meta


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate counting bytes read + written (METHOD.md's ceiling)."""
    if DEVICE != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), warmup=3, iters=10)["p50_ms"]
    return 2 * nbytes / (t / 1e3) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    if DEVICE != "cuda":
        n = 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, iters=10)["p50_ms"]
    return 2 * n ** 3 / (t / 1e3) / 1e12


def random_state_dict(fields: dict, device=DEVICE, dtype=torch.bfloat16, seed: int = 0, norm_std: float = 0.0) -> dict:
    """Random weights with the released tensor names and shapes (HF-style init: std 0.02, unit norms; with
    ``norm_std`` the RMSNorm gains are 1 + norm_std * N(0, 1), as in a trained checkpoint)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, f, V = fields["hidden_size"], fields["intermediate_size"], fields["vocab_size"]
    hd = d // fields["num_attention_heads"]
    q, kv = fields["num_attention_heads"] * hd, fields["num_key_value_heads"] * hd

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    def gain():
        return (1 + rnd(d, std=norm_std).float()).to(dtype) if norm_std else torch.ones(d, device=device, dtype=dtype)

    sd = {"model.embed_tokens.weight": rnd(V, d), "model.norm.weight": gain()}
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": gain(), p + "post_attention_layernorm.weight": gain(),
                   p + "self_attn.q_proj.weight": rnd(q, d), p + "self_attn.q_proj.bias": rnd(q),
                   p + "self_attn.k_proj.weight": rnd(kv, d), p + "self_attn.k_proj.bias": rnd(kv),
                   p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.v_proj.bias": rnd(kv),
                   p + "self_attn.o_proj.weight": rnd(d, q), p + "mlp.gate_proj.weight": rnd(f, d),
                   p + "mlp.up_proj.weight": rnd(f, d), p + "mlp.down_proj.weight": rnd(d, f)})
    if not fields["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(V, d)
    return sd


def weight_bytes(sd: dict, include_embedding: bool = True) -> int:
    return sum(t.numel() * t.element_size() for k, t in sd.items()
               if include_embedding or k != "model.embed_tokens.weight")


def step_weight_bytes(sd: dict) -> int:
    """Bytes a decode step must read: every layer, the final norm and the LM head. The embedding table is
    only gathered (a few rows), except when the head is tied to it (the 1.5B): then the head reads it all."""
    tied = "lm_head.weight" not in sd
    return weight_bytes(sd, include_embedding=tied)


def hf_model(fields: dict, sd: dict):
    """transformers' Qwen2ForCausalLM sharing ``sd``'s storage, eager attention (the original's path)."""
    import transformers

    raw = {k: v for k, v in fields.items() if k not in ("auto_map", "architectures", "model_type", "bd_size",
                                                      "conplemenrary_mask", "torch_dtype")}
    cfg = transformers.Qwen2Config(**raw)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if fields["tie_word_embeddings"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE inverse frequencies) were built on meta: rebuild the module on the GPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(DEVICE)
    return model.eval().requires_grad_(False)


def block_causal_additive(q_len: int, kv_len: int, block: int = 32, dtype=torch.bfloat16, device=DEVICE):
    """The original's eval mask over absolute positions, in the additive form eager attention adds."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)
    kpos = torch.arange(kv_len, device=device)
    allowed = (qpos[:, None] // block) >= (kpos[None, :] // block)
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
