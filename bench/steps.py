"""Decode-step benchmark at the released shapes (batch 1, random bf16 weights, prefix 2048 by default).

Steps: ``full`` (32 queries, the block cache rebuilt), ``sub`` (8 queries against prefix + block cache),
``commit`` (32 tokens appended to the prefix cache), ``sub_skip12`` (a sub-block step with 12 of 28 layers
skipped by a reuse policy). Providers: ``hf`` (transformers Qwen2, eager, block-causal mask, DynamicCache: the
original's path), ``torch`` (our runtime, PyTorch backend, eager), ``triton`` (our runtime, Triton kernels and
CUDA graphs).
The floor is the weight bytes a step must read over the measured copy bandwidth.

    python bench/steps.py --shapes 7B,1.5B --providers hf,torch,triton
"""
import argparse
import gc

import torch

from common import (RELEASED_IDS, SHAPES, copy_bandwidth_gbs, env_info, cuda_time, hf_model, random_state_dict,
                    record, step_weight_bytes, weight_bytes)

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from fastdllm_rt.batch import Kind, RowRequest


def hf_steps(fields, sd, prefix):
    from transformers import DynamicCache

    from common import DEVICE, block_causal_additive

    model = hf_model(fields, sd)
    ids = torch.randint(0, 150000, (1, prefix + 32), device=DEVICE)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True,
              attention_mask=block_causal_additive(prefix, prefix))
    pos = torch.arange(prefix, prefix + 32, device=DEVICE)[None]
    mask32 = block_causal_additive(32, prefix + 32)
    mask8 = torch.zeros(1, 1, 8, prefix + 8, dtype=torch.bfloat16, device=DEVICE)
    saved = [(layer.keys, layer.values) for layer in cache.layers]

    def run(n, mask):
        with torch.no_grad():
            model(input_ids=ids[:, prefix:prefix + n], past_key_values=cache, use_cache=True,
                  position_ids=pos[:, :n], attention_mask=mask)
        for layer, (k, v) in zip(cache.layers, saved):     # back to the prefix (the update concatenated)
            layer.keys, layer.values = k, v

    return {"full": lambda: run(32, mask32), "sub": lambda: run(8, mask8), "commit": lambda: run(32, mask32)}, model


def ours_steps(rt, prefix, policy_layers=12):
    """Closures for each step kind through the runtime's Engine, as sampling runs them: on the triton backend a
    step is a CUDA-graph replay (metadata upload + replay); on torch an eager packed forward. Also returns the
    engine (its graph runner tells which graph a step replayed)."""
    from fastdllm_rt.engine import Engine
    from fastdllm_rt.stats import CallStats

    policy = ReusePolicy("last", k=2, subset_size=policy_layers)
    caches = rt.new_caches(1, prefix + 64, policy)
    engine = Engine(rt.model, caches, rt.token_ids.mask, use_block_cache=True,
                    reuse=rt.reuse_runtime(policy, caches), stats=CallStats(num_layers=rt.config.num_hidden_layers))
    slot = caches.alloc()
    ids = torch.randint(0, 150000, (prefix + 32,))
    engine.run([RowRequest(Kind.PREFILL, slot, 0, ids[:prefix])])
    block = ids[prefix:]
    engine.run([RowRequest(Kind.FULL, slot, prefix, block, logits_at=list(range(8)))])

    def fwd(kind, start, toks, skip=False, logits=8):
        engine.run([RowRequest(kind, slot, start, toks, logits_at=list(range(logits)), skip=skip)])

    return {"full": lambda: fwd(Kind.FULL, prefix, block),
            "sub": lambda: fwd(Kind.SUB, prefix + 8, block[8:16]),
            "sub_skip12": lambda: fwd(Kind.SUB, prefix + 8, block[8:16], skip=True),
            # commit at a fixed position: it rewrites the same prefix slots each time
            "commit": lambda: fwd(Kind.COMMIT, prefix, block, logits=1)}, engine


def measure_provider(shape, fields, sd, provider, args, floor_ms, step_bytes, command) -> list:
    engine = None
    if provider == "hf":
        steps, keep = hf_steps(fields, sd, args.prefix)
    else:
        keep = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend=provider,
                                           **RELEASED_IDS)
        steps, engine = ours_steps(keep, args.prefix)
    out = []
    for name, fn in steps.items():
        with torch.inference_mode():
            t = cuda_time(fn, warmup=5, iters=args.iters)
        # the step as the sampler runs it (host: batch packing + metadata upload, then the graph) and, beside
        # it, the graph replay alone: the GPU's share
        replay = {}
        runner = getattr(engine, "graphs", None)
        if getattr(runner, "last", None) is not None:
            r = cuda_time(runner.last.graph.replay, warmup=3, iters=args.iters)
            replay = {"graph_replay_p50_ms": r["p50_ms"], "graph_replay_ratio_to_floor": r["p50_ms"] / floor_ms}
        row = record("steps", shape=shape, provider=provider, step=name, prefix=args.prefix, batch=1,
                     dtype="bf16", **t, floor_ms=floor_ms, ratio_to_floor=t["p50_ms"] / floor_ms,
                     achieved_GBps=step_bytes / (t["p50_ms"] / 1e3) / 1e9, **replay, command=command)
        out.append((shape, provider, name, t["p50_ms"], row["ratio_to_floor"], replay.get("graph_replay_p50_ms")))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--providers", default="hf,torch,triton")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    command = "python bench/steps.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    bw = copy_bandwidth_gbs()
    record("ceilings", metric="copy_bandwidth_GBps", value=bw, command=command)
    table = []
    for shape in args.shapes.split(","):
        fields = SHAPES[shape]
        sd = random_state_dict(fields)
        step_bytes = step_weight_bytes(sd)
        floor_ms = step_bytes / (bw * 1e9) * 1e3
        all_ms = weight_bytes(sd) / (bw * 1e9) * 1e3
        record("steps", shape=shape, provider="floor", step="weights_once", p50_ms=floor_ms, p20_ms=floor_ms,
               p80_ms=floor_ms, weight_bytes=step_bytes, all_weights_ms=all_ms, command=command)
        table.append((shape, "floor", "weights", floor_ms, 1.0, None))
        for provider in args.providers.split(","):
            table += measure_provider(shape, fields, sd, provider, args, floor_ms, step_bytes, command)
            gc.collect()
            torch.cuda.empty_cache()
        del sd
        gc.collect()
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bw:.0f} GB/s on {env_info()['gpu']}")
    print(f"{'shape':6} {'provider':14} {'step':11} {'p50 ms':>8} {'x floor':>8} {'replay ms':>9} {'x floor':>8}")
    for shape, prov, name, ms, ratio, rep in table:
        extra = f" {rep:9.3f} {rep / (ms / ratio):8.2f}" if rep is not None else ""
        print(f"{shape:6} {prov:14} {name:11} {ms:8.3f} {ratio:8.2f}{extra}")


if __name__ == "__main__":
    main()
