"""Does prefetching a layer's gate/up weight into the L2, while the layer's latency-bound kernels run, shorten
a decode layer?

A batch-1 decode layer streams its weights at full bandwidth only in the big MLP projections; during the QKV
projection, attention and the O projection (small weights, a few MB of KV) the memory system is mostly idle.
Here a side stream issues ``cp.async.bulk.prefetch.L2`` for the first ``P`` MB of the layer's gate/up weight
when the layer starts (one tiny kernel: a prefetch instruction per lane holds no registers or shared memory),
and the gate/up projection waits for it. The chain of ``--layers`` layers (each its own weights, together
beyond the L2, so each layer starts cold as in a step) is captured in one CUDA graph; the time per layer is
compared with the same chain without prefetch, in the same process.

    python bench/probes/l2_prefetch.py --shapes 1.5B,7B --prefetch-mb 0,8,16,24,32,40
"""
import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (ATTENTION_HEADS, DEVICE, SHAPES, copy_bandwidth_gbs, cuda_time,  # noqa: E402
                    decode_attention_inputs)
from fastdllm_kernels.attention.kernel import decode_attention  # noqa: E402
from fastdllm_kernels.linear.dispatch import linear  # noqa: E402
from fastdllm_kernels.timing import append_record  # noqa: E402

RESULTS = os.environ.get("FASTDLLM_BENCH_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@triton.jit
def l2_prefetch_kernel(p, nbytes, p_sink, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Each lane asks the L2 to fetch one CHUNK-byte piece of [p, p + nbytes) (nbytes a multiple of CHUNK);
    the instruction returns at once, the lines arrive while later kernels run."""
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    off = tl.minimum(lane.to(tl.int64) * CHUNK, nbytes - CHUNK)
    r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [p.to(tl.pointer_type(tl.int8)) + off, tl.full([LANES], CHUNK, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.store(p_sink + lane, r, mask=r != 0)            # never stores: keeps the instruction live


def l2_prefetch(w: torch.Tensor, nbytes: int, sink: torch.Tensor, chunk: int = 65536, lanes: int = 128):
    nbytes = min(nbytes, w.numel() * w.element_size()) // chunk * chunk
    if nbytes:
        l2_prefetch_kernel[(triton.cdiv(nbytes // chunk, lanes),)](w, nbytes, sink, CHUNK=chunk, LANES=lanes,
                                                                   num_warps=4)


def layer_weights(fields, n_layers, prefix, n_q, dev=DEVICE, dt=torch.bfloat16):
    d, f = fields["hidden_size"], fields["intermediate_size"]
    hq, hkv = fields["num_attention_heads"], fields["num_key_value_heads"]
    D = d // hq
    layers = []
    for _ in range(n_layers):
        q, pk, pv, bk, bv, meta = decode_attention_inputs(hq, hkv, prefix, n_q, D, dt)
        layers.append(dict(qkv=torch.randn((hq + 2 * hkv) * D, d, device=dev, dtype=dt) * 0.02,
                           o=torch.randn(d, hq * D, device=dev, dtype=dt) * 0.02,
                           gate_up=torch.randn(2 * f, d, device=dev, dtype=dt) * 0.02,
                           down=torch.randn(d, f, device=dev, dtype=dt) * 0.02,
                           attn=(q, pk, pv, bk, bv, meta)))
    return layers


def run_chain(layers, x, n_q, prefetch_bytes, sink, side, chunk, num_sms):
    """``side`` None: the prefetch kernel runs on the main stream, in line before the layer's QKV projection."""
    main = torch.cuda.current_stream()
    for L in layers:
        if prefetch_bytes and side is None:
            l2_prefetch(L["gate_up"], prefetch_bytes, sink, chunk)
        elif prefetch_bytes:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                l2_prefetch(L["gate_up"], prefetch_bytes, sink, chunk)
        linear(x, L["qkv"], row_rms=True, num_sms=num_sms)            # the QKV projection's bytes and latency
        q, pk, pv, bk, bv, meta = L["attn"]
        a = decode_attention(q, pk, pv, bk, bv, *meta, n_q=n_q, scale=q.shape[-1] ** -0.5, num_sms=num_sms)
        h = linear(a.reshape(n_q, -1), L["o"], residual=x, num_sms=num_sms)
        if prefetch_bytes and side is not None:
            main.wait_stream(side)
        g = linear(h, L["gate_up"], row_rms=True, swiglu=True, num_sms=num_sms)
        x = linear(g, L["down"], residual=h, num_sms=num_sms)
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1.5B,7B")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--queries", default="32,8")
    ap.add_argument("--prefetch-mb", default="0,8,16,24,32,40")
    ap.add_argument("--chunks", default="65536")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--placements", default="side,main", help="side: a forked stream; main: in line")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = "python bench/probes/l2_prefetch.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                              for k, v in vars(args).items())
    bw = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(1 << 16, dtype=torch.int32, device=DEVICE)
    side = torch.cuda.Stream()
    print(f"copy bandwidth {bw:.0f} GB/s, L2 {torch.cuda.get_device_properties(0).L2_cache_size >> 20} MB")
    for shape in args.shapes.split(","):
        fields = SHAPES[shape]
        for n_q in map(int, args.queries.split(",")):
            layers = layer_weights(fields, args.layers, args.prefix, n_q)
            x = torch.randn(n_q, fields["hidden_size"], device=DEVICE, dtype=torch.bfloat16)
            layer_bytes = sum(layers[0][k].numel() * 2 for k in ("qkv", "o", "gate_up", "down"))
            kv_bytes = 2 * ATTENTION_HEADS[shape][1] * (args.prefix + 32) * 128 * 2
            floor_us = (layer_bytes + kv_bytes) / bw / 1e3
            base = None
            for chunk, placement, mb in itertools.product(map(int, args.chunks.split(",")),
                                                          args.placements.split(","),
                                                          map(float, args.prefetch_mb.split(","))):
                if mb == 0 and base is not None:
                    continue
                stream = side if placement == "side" else None
                nbytes = int(mb * (1 << 20))
                run_chain(layers, x, n_q, nbytes, sink, stream, chunk, sms)          # compile, warm
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run_chain(layers, x, n_q, nbytes, sink, stream, chunk, sms)
                t = cuda_time(g.replay, warmup=3, iters=20)
                us = t["p50_ms"] * 1e3 / args.layers
                base = us if mb == 0 else base
                row = append_record(os.path.join(RESULTS, "l2_prefetch.jsonl"), dict(
                    shape=shape, queries=n_q, prefix=args.prefix, prefetch_mb=mb, chunk=chunk,
                    placement=placement,
                    layer_us=us, floor_us=floor_us, vs_no_prefetch=us / base, copy_GBps=bw,
                    layers=args.layers, command=command))
                print(f"{shape:5} q={n_q:2d} prefetch {mb:5.1f} MB chunk {chunk:6d} {placement:4}: {us:7.2f} us "
                      f"({us / floor_us:.2f} x floor {floor_us:.1f}; {row['vs_no_prefetch']:.3f} x none)",
                      flush=True)
                del g
            del layers
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
