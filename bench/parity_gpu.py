"""GPU parity at the released shapes: at the 7B shape with random bf16 weights, the plain forward and one full-block step
of our bf16 path agree with our fp32 torch path within the bf16 tier (CONTRIBUTING.md, "Tolerances"): max|ours - fp32| <=
2 max|HF bf16 - fp32| + 1e-5, or relative RMS < 5e-3. Also checks the triton backend when it is available.

    python bench/parity_gpu.py [--shape 7B] [--backends torch,triton]
    python bench/parity_gpu.py --shape tiny --prefix 64 --backends torch --device cpu        # smoke run
"""
import argparse

from common import (DEVICE, SHAPES, add_run_args, block_causal_additive, free_memory, hf_model, random_ids,
                    random_state_dict, record, start, token_ids)

import torch

import fastdllm_rt
from fastdllm_rt.batch import Kind, RowRequest, build_batch


def ours_logits(rt, ids, prefix):
    """(plain forward logits of the last 32 positions, full-block step logits after a prefill of ``prefix``)."""
    n = len(ids)
    plain = RowRequest(Kind.PLAIN, 0, 0, torch.tensor(ids), logits_at=list(range(n - 32, n)))
    a = rt.model(build_batch([plain], rt.device, 32), None).logits
    caches = rt.pool.acquire(1, n + 64, None)
    slot = caches.alloc()
    rt.model(build_batch([RowRequest(Kind.PREFILL, slot, 0, torch.tensor(ids[:prefix]))], rt.device, 32), caches)
    full = RowRequest(Kind.FULL, slot, prefix, torch.tensor(ids[prefix:prefix + 32]), logits_at=list(range(32)))
    b = rt.model(build_batch([full], rt.device, 32), caches).logits
    rt.release_caches()
    return a.float(), b.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--backends", default="torch")
    ap.add_argument("--norm-std", type=float, default=0.0,
                    help="RMSNorm gains 1 + std * N(0, 1) (0: unit gains; the triton backend folds gains into weights)")
    add_run_args(ap)
    args = ap.parse_args()
    command = start(args, "parity_gpu.py")
    torch.backends.cuda.matmul.allow_tf32 = False
    fields = SHAPES[args.shape]
    kw = token_ids(fields["vocab_size"])
    sd = random_state_dict(fields, norm_std=args.norm_std)
    g = torch.Generator().manual_seed(0)
    ids = random_ids(fields["vocab_size"], args.prefix + 32, generator=g).tolist()
    ids[args.prefix + 5:args.prefix + 32] = [kw["mask_token_id"]] * 27          # a block being denoised
    ids_t = torch.tensor([ids], device=DEVICE)
    hf = hf_model(fields, sd)
    with torch.no_grad():
        n = len(ids)
        hf_plain = hf(input_ids=ids_t, attention_mask=block_causal_additive(n, n)).logits[0, -32:].float()
    del hf
    free_memory()
    ref = fastdllm_rt.from_state_dict(fields, sd, dtype="fp32", backend="torch", device=DEVICE, **kw)
    with torch.inference_mode():
        ref_plain, ref_full = ours_logits(ref, ids, args.prefix)
    del ref
    free_memory()
    hf_err = float((hf_plain - ref_plain).abs().max())
    rows = []
    for backend in args.backends.split(","):
        rt = fastdllm_rt.from_state_dict(fields, sd, dtype="bf16", backend=backend, device=DEVICE, **kw)
        with torch.inference_mode():
            plain, full = ours_logits(rt, ids, args.prefix)
        for what, got, want in (("plain_forward", plain, ref_plain), ("full_block_step", full, ref_full)):
            max_err = float((got - want).abs().max())
            rel_rms = float((got - want).norm() / want.norm())
            ok = max_err <= 2 * hf_err + 1e-5 or rel_rms < 5e-3
            rows.append(record("parity", shape=args.shape, backend=backend, dtype="bf16", check=what,
                               prefix=args.prefix, norm_std=args.norm_std, max_abs_err=max_err, rel_rms=rel_rms,
                               hf_bf16_max_abs_err=hf_err, within_bf16_tier=ok, command=command))
        del rt
        free_memory()
    print(f"{'backend':8} {'check':16} {'max|err|':>10} {'relRMS':>9} {'HF bf16 max|err|':>17} ok")
    for r in rows:
        print(f"{r['backend']:8} {r['check']:16} {r['max_abs_err']:10.4f} {r['rel_rms']:9.2e} "
              f"{r['hf_bf16_max_abs_err']:17.4f} {r['within_bf16_tier']}")


if __name__ == "__main__":
    main()
