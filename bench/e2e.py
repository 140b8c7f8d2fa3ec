"""End-to-end generation at one token per forward (threshold 1): random bf16 weights at the released shape,
512-token prompts, 256 new tokens, batch 1 / 8 / 32, block cache on (most steps are 8-token sub-block
forwards). Ours: the runtime's generate on the given backend. Baseline: the original HF path, decoding one
token per forward the same way (a block-causal forward per step with a DynamicCache), at batch 1.

Reports tokens/s, forwards, and the share of wall time spent outside forwards (host work between steps).

    python bench/e2e.py --shape 7B --batches 1,8,32 [--hf-tokens 64]
    python bench/e2e.py --shape tiny --batches 1,2 --prompt 64 --new 32 --hf-tokens 4 --backend torch --device cpu
"""
import argparse
import time

from common import (DEVICE, SHAPES, add_run_args, block_causal_additive, free_memory, hf_model, random_ids,
                    random_state_dict, record, start, sync, token_ids)

import torch

import fastdllm_rt


def ids_of(vocab_size: int) -> dict:
    """The mask and pad ids, the pad id also serving as the stop token."""
    ids = token_ids(vocab_size)
    return dict(ids, stop_token_id=ids["pad_token_id"])


def ours(rt, batch, prompt_len, new, backend):
    g = torch.Generator().manual_seed(batch)
    prompts = [random_ids(rt.config.vocab_size, prompt_len, generator=g).tolist() for _ in range(batch)]
    kw = dict(max_new_tokens=new, threshold=1.0, use_block_cache=True, batch_size=batch)
    rt.generate(prompts[:1] if batch > 1 else prompts, **dict(kw, max_new_tokens=min(64, new)))   # warm: kernels
    rt.generate(prompts, **kw)
    sync()
    graphs_before = captured_graphs(rt)
    t0 = time.perf_counter()
    out = rt.generate(prompts, **kw)
    sync()
    wall = time.perf_counter() - t0
    st = out.stats
    return {"tokens": st.tokens_generated, "wall_s": wall, "forward_time_s": st.forward_time_s,
            "outside_forwards": max(0.0, 1 - st.forward_time_s / wall), "model_calls": st.model_calls,
            "tokens_per_s": st.tokens_generated / wall, "graphs_captured_in_timed_call": captured_graphs(rt) - graphs_before}


def captured_graphs(rt) -> int:
    """CUDA graphs captured so far by the runners of the runtime's pooled caches (a capture inside the timed
    call counts in its forwards)."""
    return sum(r.captures for r in rt.pool.runners.values())


def hf_baseline(fields, sd, prompt_len, new):
    """One token per forward the original way: every step a block-causal forward of the current block (32
    tokens) against the cached prefix, appending nothing; a commit after each block."""
    from transformers import DynamicCache

    model = hf_model(fields, sd)
    ids = random_ids(fields["vocab_size"], 1, prompt_len, device=DEVICE)
    steps = 0
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True,
              attention_mask=block_causal_additive(prompt_len, prompt_len))
        block = random_ids(fields["vocab_size"], 1, 32, device=DEVICE)
        made = 0
        while made < new:
            saved = [(layer.keys, layer.values) for layer in cache.layers]
            start = cache.get_seq_length()
            pos = torch.arange(start, start + 32, device=DEVICE)[None]
            for _ in range(min(32, new - made)):     # one token per forward
                logits = model(input_ids=block, past_key_values=cache, use_cache=True, position_ids=pos,
                               attention_mask=block_causal_additive(32, start + 32)).logits
                block[0, made % 32] = logits[0, made % 32].argmax()
                for layer, (k, v) in zip(cache.layers, saved):
                    layer.keys, layer.values = k, v
                made += 1
                steps += 1
            model(input_ids=block, past_key_values=cache, use_cache=True, position_ids=pos,
                  attention_mask=block_causal_additive(32, start + 32))    # commit
            steps += 1
    sync()
    wall = time.perf_counter() - t0
    del model
    return {"tokens": new, "wall_s": wall, "forwards": steps + 1, "tokens_per_s": new / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--hf-tokens", type=int, default=64)
    ap.add_argument("--backend", default="triton")
    add_run_args(ap)
    args = ap.parse_args()
    command = start(args, "e2e.py")
    fields = SHAPES[args.shape]
    sd = random_state_dict(fields)
    rows = []
    if args.hf_tokens:
        r = hf_baseline(fields, sd, args.prompt, args.hf_tokens)
        rows.append(record("e2e", shape=args.shape, provider="hf", batch=1, prompt=args.prompt,
                           new_tokens=args.hf_tokens, threshold=1.0, **r, command=command))
        free_memory()
    rt = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend=args.backend, device=DEVICE,
                                     **ids_of(fields["vocab_size"]))
    for b in [int(x) for x in args.batches.split(",")]:
        r = ours(rt, b, args.prompt, args.new, args.backend)
        rows.append(record("e2e", shape=args.shape, provider=args.backend, batch=b, prompt=args.prompt,
                           new_tokens=args.new, threshold=1.0, **r, command=command))
    print(f"{'provider':8} {'batch':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'outside fwd':>11}")
    for r in rows:
        print(f"{r['provider']:8} {r['batch']:5d} {r['tokens']:7d} {r['wall_s']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r.get('outside_forwards', float('nan')):11.3f}")


if __name__ == "__main__":
    main()
