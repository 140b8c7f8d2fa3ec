"""The benchmarks' shared harness: random weights at the released shapes, the Hugging Face baseline
(transformers Qwen2 modules with a block-causal mask, eager attention), ceilings (copy bandwidth, bf16 matmul
rate) and records. Timing and records come from ``fastdllm_kernels.timing``, which the tiling sweep shares:
every measurement is one JSON line in ``bench/results/<suite>.jsonl`` naming card, versions, commit, date and
the command that reproduces it.

Every script takes ``--device cpu`` (smoke runs: a tiny shape, the torch backend, times meaningless) and
``--out DIR``. Records go to ``--out``, else ``$FASTDLLM_BENCH_OUT``, else ``bench/results`` on a GPU and a
temporary folder on the CPU, so a CPU run never lands among the GPU measurements."""
from __future__ import annotations

import gc
import os
import sys
import tempfile

# ``--device cpu`` hides the GPU before torch first looks for one: DEVICE below is fixed at import
if "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu" for a, b in zip(sys.argv, sys.argv[1:])):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastdllm_kernels.timing import (DEVICE, append_record, copies_beyond_l2, copy_bandwidth_gbs, cuda_time,  # noqa: F401
                                     env_info, graph_time, sync)  # noqa: E402

# the released checkpoints' config.json (Fast-dLLM v2 7B; the 1.5B differs in the fields below)
RELEASED_7B_FIELDS = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0, "bd_size": 32,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "Fast_dLLM_Qwen", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "pad_token_id": 151645, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}
RELEASED_1_5B_FIELDS = dict(RELEASED_7B_FIELDS, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                            num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, max_window_layers=21)
SHAPES = {"7B": RELEASED_7B_FIELDS, "1.5B": RELEASED_1_5B_FIELDS,
          # for smoke-testing the scripts on a CPU (head_dim 128 as released, so the triton backend runs it too)
          "tiny": dict(RELEASED_1_5B_FIELDS, hidden_size=256, intermediate_size=512, num_attention_heads=2,
                       num_key_value_heads=1, num_hidden_layers=4, max_window_layers=4, vocab_size=2048,
                       bos_token_id=2045, eos_token_id=2046, pad_token_id=2045)}
# the released checkpoints' mask / stop / pad token ids (random weights have no tokenizer to read them from)
RELEASED_IDS = dict(mask_token_id=151665, stop_token_id=151645, pad_token_id=151643)


def token_ids(vocab_size: int) -> dict:
    """The mask / stop / pad ids for a vocabulary: the released ones, or the top three ids of a tiny one."""
    if vocab_size > RELEASED_IDS["mask_token_id"]:
        return RELEASED_IDS
    return dict(mask_token_id=vocab_size - 1, stop_token_id=vocab_size - 2, pad_token_id=vocab_size - 3)


def random_ids(vocab_size: int, *shape, generator=None, device="cpu") -> torch.Tensor:
    """Random ordinary tokens (below the special ids)."""
    return torch.randint(0, min(150000, vocab_size - 8), shape, generator=generator, device=device)
# (query heads, KV heads) of the released models' attention
ATTENTION_HEADS = {name: (SHAPES[name]["num_attention_heads"], SHAPES[name]["num_key_value_heads"])
                   for name in ("7B", "1.5B")}
RESULTS = os.environ.get("FASTDLLM_BENCH_OUT") or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
                                                   if DEVICE == "cuda" else os.path.join(tempfile.gettempdir(),
                                                                                         "fastdllm_bench_cpu"))


def add_run_args(ap) -> None:
    """The options every script shares: ``--device`` and ``--out``."""
    ap.add_argument("--device", default=DEVICE, choices=["cuda", "cpu"],
                    help="cpu: a smoke run of the script's code path (times meaningless, records off bench/results)")
    ap.add_argument("--out", default=None, help="folder for the records (default: $FASTDLLM_BENCH_OUT, else "
                                                "bench/results on a GPU, a temporary folder on the CPU)")


def start(args, script: str) -> str:
    """Check ``--device``, point the records at ``--out``; returns the command line records name."""
    global RESULTS
    if args.device != DEVICE:
        sys.exit(f"{script}: --device {args.device} asked, but torch sees {DEVICE} (no CUDA GPU?)")
    if args.out:
        RESULTS = args.out
    print(f"{script}: records go to {RESULTS}", flush=True)
    return f"python bench/{script} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                              if k not in ("out", "device") and v is not None) + \
        (" --device cpu" if DEVICE == "cpu" else "")


def record(file: str, **row) -> dict:
    """Append one measurement to ``RESULTS/<file>.jsonl`` and return it."""
    return append_record(os.path.join(RESULTS, file + ".jsonl"), row)


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rotating_graph_ms(body, copies: int, reps: int = 3, iters: int = 20) -> float:
    """Median GPU time (ms) of one ``body(i)`` call: ``reps`` passes over ``i = 0 .. copies - 1`` captured in one
    CUDA graph, so a call's inputs were last touched ``copies - 1`` calls earlier - pick ``copies`` with
    ``copies_beyond_l2`` so that every call reads its inputs from HBM."""
    for i in range(copies):
        body(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for i in range(copies):
                body(i)
    return cuda_time(g.replay, warmup=3, iters=iters)["p50_ms"] / (reps * copies)


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


@triton.jit
def read_sum_kernel(p, n, p_sink, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Read ``n`` elements; the sum is stored only if it equals an impossible value, so the loads stay live."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.range(pid * BLOCK, n, G * BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


def plain_read_ms(nbytes: int, copies: int, per_sm=(1, 2, 4, 8), blocks=(4096, 16384), stages=(2, 4)) -> float:
    """The plainest read of ``nbytes`` there is - a grid of programs summing the bytes in pipelined chunks, no
    MMA, no epilogue - best over grid, chunk and pipeline depth, each call on its own of ``copies`` buffers (so
    cold in the L2): the ceiling a kernel that must read those bytes is judged against."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bufs = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_() for _ in range(copies)]
    sink = torch.zeros(1, device=DEVICE)
    best = float("inf")
    for p in per_sm:
        for block in blocks:
            for st in stages:
                def fn(i, grid=min(p * sms, triton.cdiv(bufs[0].numel(), block)), block=block, st=st):
                    read_sum_kernel[(grid,)](bufs[i], bufs[i].numel(), sink, BLOCK=block, STAGES=st, num_warps=4)
                best = min(best, rotating_graph_ms(fn, copies, reps=max(1, 20 // copies)))
    return best


def matmul_tflops(n: int = 8192) -> float:
    """The bf16 matmul rate torch reaches on this card: the ceiling compute-bound work is compared with."""
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
