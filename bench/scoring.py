"""MMLU-like scoring throughput: random bf16 weights at the released shapes; 512 questions, each a
five-shot-sized context of 500-900 random tokens (no prefix shared between questions) and four one-token
choices.

Ours: ``rt.score`` (trajectory, block cache off as the bridge's default; batch size auto). Baseline: the
original evaluation path, one plain block-causal forward per request with all logits, one request at a time
(HF modules, eager), timed on the first ``--orig-questions`` questions. Also checks that batched scores equal
the unbatched scorer's within the bf16 tier (trajectory and first_token) on a subset, and reports achieved
TFLOP/s (2 x non-embedding parameters x context tokens) against the measured bf16 matmul rate.

    python bench/scoring.py --shapes 7B,1.5B [--questions 512] [--orig-questions 16]
    python bench/scoring.py --shapes tiny --questions 4 --orig-questions 1 --check-questions 2 --context 40,80 \
        --backend torch --device cpu                                                        # smoke run
"""
import argparse
import time

from common import (DEVICE, SHAPES, add_run_args, block_causal_additive, free_memory, hf_model, matmul_tflops,
                    random_ids, random_state_dict, record, start, sync, token_ids)

import torch

import fastdllm_rt


def workload(n, vocab_size, context=(500, 900), seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(context[0], context[1] + 1, (n,), generator=g).tolist()
    qs = []
    for L in lens:
        ctx = random_ids(vocab_size, L, generator=g).tolist()
        choices = random_ids(vocab_size, 4, generator=g).tolist()
        qs.append((ctx, choices))
    return qs


def requests_of(qs):
    return [(ctx, [c]) for ctx, choices in qs for c in choices]


def original(model, qs, mask_id, eos):
    """The original evaluation: each choice scored by one plain block-causal forward of context + choice
    (the choice masked, an end-of-sequence token after it), one request at a time."""
    out = []
    with torch.no_grad():
        for ctx, choices in qs:
            for c in choices:
                seq = ctx + [c]
                n = len(seq)
                x = seq + [mask_id] * ((n // 32 + 1) * 32 - n)
                x[len(ctx)] = mask_id
                x[n] = eos
                t = torch.tensor([x], device=DEVICE)
                logits = model(input_ids=t, attention_mask=block_causal_additive(len(x), len(x))).logits
                out.append(float(torch.log_softmax(logits[0, len(ctx) - 1].float(), -1)[c]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--questions", type=int, default=512)
    ap.add_argument("--orig-questions", type=int, default=16)
    ap.add_argument("--check-questions", type=int, default=16)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--context", default="500,900", help="context lengths drawn from this range (tokens)")
    ap.add_argument("--scorings", default="trajectory,first_token")
    ap.add_argument("--prefix-cache", default="on", help="on, off, or both in one process: on,off")
    add_run_args(ap)
    args = ap.parse_args()
    command = start(args, "scoring.py")
    peak = matmul_tflops()
    record("ceilings", metric="bf16_matmul_TFLOPs", value=peak, command=command)
    context = tuple(int(x) for x in args.context.split(","))
    table = []
    for shape in args.shapes.split(","):
        fields = SHAPES[shape]
        V = fields["vocab_size"]
        ids = token_ids(V)
        qs = workload(args.questions, V, context)
        warm = workload(args.questions, V, context, seed=1)         # same sizes, other questions
        ctx_tokens = sum(len(c) for c, _ in qs)
        sd = random_state_dict(fields)
        n_params = sum(t.numel() for k, t in sd.items() if k != "model.embed_tokens.weight")
        if args.orig_questions:
            model = hf_model(fields, sd)
            sub = qs[:args.orig_questions]
            original(model, sub[:1], ids["mask_token_id"], ids["stop_token_id"])
            sync()
            t0 = time.perf_counter()
            original(model, sub, ids["mask_token_id"], ids["stop_token_id"])
            sync()
            dt = time.perf_counter() - t0
            table.append(record("scoring", shape=shape, provider="original", questions=len(sub), seconds=dt,
                                questions_per_s=len(sub) / dt, command=command))
            del model
            free_memory()
        rt = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend=args.backend, device=DEVICE, **ids)
        del sd                                                          # the runtime holds its own copy
        free_memory()
        reqs = requests_of(qs)
        check = requests_of(qs[:args.check_questions])
        measured = {}
        cache = rt.prefix_cache
        for setting in args.prefix_cache.split(","):
            rt.prefix_cache = cache if setting == "on" else None
            for scoring in args.scorings.split(","):
                kw = dict(scoring=scoring, use_block_cache=False)
                if cache is not None:
                    cache.clear()
                rt.score(requests_of(warm), **kw)                        # warm-up on other questions: compiles
                sync()
                t0 = time.perf_counter()
                res = rt.score(reqs, **kw)
                sync()
                dt = time.perf_counter() - t0
                single = [rt.score([r], **kw).loglikelihoods[0] for r in check]
                measured[scoring, setting] = (dt, res, res.loglikelihoods[:len(check)], single)
        del rt
        free_memory()
        # the bf16 tier (CONTRIBUTING.md, "Tolerances"): batched bf16 scores against an fp32 reference, no worse
        # than twice the unbatched bf16 scores' error (or relative RMS < 5e-3)
        rt32 = fastdllm_rt.from_state_dict(fields, random_state_dict(fields), dtype="fp32", backend="torch",
                                           device=DEVICE, **ids)
        free_memory()
        for (scoring, setting), (dt, res, batched, single) in measured.items():
            ref = torch.tensor(rt32.score(check, scoring=scoring, use_block_cache=False).loglikelihoods)
            a, b = torch.tensor(batched), torch.tensor(single)
            err_batched, err_single = float((a - ref).abs().max()), float((b - ref).abs().max())
            rel_rms = float((a - ref).norm() / ref.norm())
            tflops = 2 * n_params * ctx_tokens / dt / 1e12
            table.append(record(
                "scoring", shape=shape, provider=f"ours-{args.backend}", scoring=scoring, prefix_cache=setting,
                questions=len(qs),
                seconds=dt, questions_per_s=len(qs) / dt, context_tokens=ctx_tokens,
                context_tokens_per_s=ctx_tokens / dt, achieved_TFLOPs=tflops, matmul_peak_TFLOPs=peak,
                fraction_of_peak=tflops / peak, row_forwards=res.stats.row_forwards,
                max_abs_diff_batched_vs_unbatched=float((a - b).abs().max()),
                max_abs_err_batched_vs_fp32=err_batched, max_abs_err_unbatched_vs_fp32=err_single,
                rel_rms_batched_vs_fp32=rel_rms,
                within_bf16_tier=bool(err_batched <= 2 * err_single + 1e-5 or rel_rms < 5e-3),
                checked_requests=len(check), notes=res.stats.notes, command=command))
        del rt32
        free_memory()
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s")
    print(f"{'shape':5} {'provider':14} {'scoring':12} {'prefix cache':12} {'q/s':>8} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'err32 batched':>13} "
          f"{'err32 single':>12} tier")
    for r in table:
        print(f"{r['shape']:5} {r['provider']:14} {r.get('scoring', '-'):12} {r.get('prefix_cache', '-'):12} "
              f"{r['questions_per_s']:8.1f} "
              f"{r.get('achieved_TFLOPs', float('nan')):8.1f} {100 * r.get('fraction_of_peak', float('nan')):6.1f} "
              f"{r.get('max_abs_err_batched_vs_fp32', float('nan')):13.2e} "
              f"{r.get('max_abs_err_unbatched_vs_fp32', float('nan')):12.2e} {r.get('within_bf16_tier', '-')}")


if __name__ == "__main__":
    main()
