"""Decode-step benchmark at the released shapes (batch 1, random bf16 weights, prefix 2048 by default).

Steps: ``full`` (32 queries, the block cache rebuilt), ``sub`` (8 queries against prefix + block cache),
``commit`` (32 tokens appended to the prefix cache), ``sub_skip12`` (a sub-block step with 12 of 28 layers
skipped by a reuse policy). Providers: ``hf`` (transformers Qwen2, eager, block-causal mask, DynamicCache: the
original's path), ``torch`` (our runtime, PyTorch backend, eager), ``triton`` (our runtime, Triton kernels and
CUDA graphs; beside each step's time, the graph replay alone, from the runner's replay events).
The floor is the weight bytes a step must read over the measured copy bandwidth.

    python bench/steps.py --shapes 7B,1.5B --providers hf,torch,triton
    python bench/steps.py --shapes tiny --providers hf,torch --prefix 64 --iters 2 --device cpu    # smoke run
"""
import argparse

from common import (DEVICE, SHAPES, add_run_args, copy_bandwidth_gbs, cuda_time, env_info, free_memory,
                    hf_model, random_ids, random_state_dict, record, start, step_weight_bytes, token_ids, weight_bytes)

import torch

import fastdllm_rt
from fastdllm_rt import ReusePolicy
from fastdllm_rt.batch import Kind, RowRequest
from fastdllm_rt.decoding import StepPlanner
from fastdllm_rt.reuse import resolve_policy
from fastdllm_rt.stats import CallStats


def hf_steps(fields, sd, prefix):
    from transformers import DynamicCache

    from common import block_causal_additive

    model = hf_model(fields, sd)
    ids = random_ids(fields["vocab_size"], 1, prefix + 32, device=DEVICE)
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
    """Closures for each step kind through the runtime's ``ForwardRunner``, with the requests the sampler's
    ``StepPlanner`` builds: on the triton backend a step is a CUDA-graph replay (batch packing + metadata upload
    + replay); on torch an eager packed forward. Also returns the runner (``runner.graphs`` is its
    ``GraphRunner``, None on torch)."""
    L = rt.config.num_hidden_layers
    # the last 12 layers (all but the first on a model of 12 or fewer)
    plan = resolve_policy(ReusePolicy("last", k=2, subset_size=min(policy_layers, L - 1)), L, True)
    caches, runner = rt.pool.start_call(1, prefix + 64, plan, CallStats(num_layers=L))
    bs = rt.block_size
    planner = StepPlanner(rt.token_ids.mask, block_size=bs, sub_block_size=8, use_block_cache=True, plan=plan)
    row = planner.new_state(caches.alloc(), prefix)
    ids = random_ids(rt.config.vocab_size, prefix + bs)
    runner.run([RowRequest(Kind.PREFILL, row.slot, 0, ids[:prefix])])
    block = ids[prefix:].tolist()
    row.new_block(prefix, block, [False] * bs)
    row.pending[:8] = [True] * 8                            # sub-block 0 undecoded: a full-block step
    full = planner.denoise_request(row)
    planner.after_denoise(row, Kind.FULL)                   # the block cache is built
    runner.run([full])
    row.pending[:8], row.pending[8:16], row.sub = [False] * 8, [True] * 8, 1
    sub = planner.denoise_request(row)                      # step 1 of the block: skips the policy's layers
    row.step += 1
    sub_compute = planner.denoise_request(row)              # step 2: computes every layer
    assert sub.kind is Kind.SUB and sub.skip and not sub_compute.skip
    commit = planner.commit_request(row)                    # at a fixed position: rewrites the same prefix slots

    def fwd(req):
        return lambda: runner.run([req])

    return {"full": fwd(full), "sub": fwd(sub_compute), "sub_skip12": fwd(sub), "commit": fwd(commit)}, runner


def replay_ms(fn, graphs, warmup: int = 3, iters: int = 30) -> dict:
    """GPU time of the graph replay alone inside step ``fn`` (``GraphRunner.time_replays``: CUDA events around
    the replay), p50/p20/p80 in ms; {} when there is no runner or the step ran eagerly."""
    if graphs is None:
        return {}
    graphs.time_replays = True
    times = []
    try:
        for i in range(warmup + iters):
            before = graphs.replays
            fn()
            if graphs.replays == before:
                return {}
            if i >= warmup:
                times.append(graphs.last_replay_ms())
    finally:
        graphs.time_replays = False
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"graph_replay_p50_ms": q(0.5), "graph_replay_p20_ms": q(0.2), "graph_replay_p80_ms": q(0.8)}


def measure_provider(shape, fields, sd, provider, args, floor_ms, step_bytes, command) -> list:
    runner = None
    if provider == "hf":
        steps, keep = hf_steps(fields, sd, args.prefix)
    else:
        keep = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend=provider, device=DEVICE,
                                           **token_ids(fields["vocab_size"]))
        steps, runner = ours_steps(keep, args.prefix)
    out = []
    for name, fn in steps.items():
        with torch.inference_mode():
            t = cuda_time(fn, warmup=5, iters=args.iters)
            # the step as the sampler runs it (host: batch packing + metadata upload, then the graph) and, beside
            # it, the graph replay alone: the GPU's share
            replay = replay_ms(fn, getattr(runner, "graphs", None), iters=args.iters)
        if replay:
            replay["graph_replay_ratio_to_floor"] = replay["graph_replay_p50_ms"] / floor_ms
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
    add_run_args(ap)
    args = ap.parse_args()
    command = start(args, "steps.py")
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
            free_memory()
        del sd
        free_memory()
    print(f"copy bandwidth {bw:.0f} GB/s on {env_info()['gpu']}")
    print(f"{'shape':6} {'provider':14} {'step':11} {'p50 ms':>8} {'x floor':>8} {'replay ms':>9} {'x floor':>8}")
    for shape, prov, name, ms, ratio, rep in table:
        extra = f" {rep:9.3f} {rep / (ms / ratio):8.2f}" if rep is not None else ""
        print(f"{shape:6} {prov:14} {name:11} {ms:8.3f} {ratio:8.2f}{extra}")


if __name__ == "__main__":
    main()
