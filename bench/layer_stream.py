"""Probe: what would one kernel per layer save on the weight stream alone?

A decode layer launches its projections as separate kernels (QKV, O, gate/up, down, with RoPE and attention in
between); each one starts cold - launch, first loads, ramp - and drains alone (bench/read_ceiling.py: a plain
read of the 1.5B's 4.7 MB O weight takes 3.8 us for 1.6 us of bytes). A persistent layer kernel would stream
the four weights back to back, with a grid-wide barrier wherever a projection needs the previous one's output.
Before building one, this script times that stream's reading alone, per layer (CUDA graphs over rotating
copies of a layer's four weights, together > 3 x L2, so every read is cold), three ways:

* ``kernels``: four plain read kernels, one per weight (the launch structure the runtime has now);
* ``barriers``: one kernel reading the four weights in turn, a grid-wide barrier between them (the persistent
  layer kernel's dependency structure; every program resident, so the barrier cannot deadlock);
* ``stream``: one kernel reading the four weights in turn without barriers (the ceiling: the weights do not
  depend on the activations, so a layer kernel that prefetches across its barriers approaches this).

``kernels`` - ``barriers`` is what fewer launches buy on the bytes; ``barriers`` - ``stream`` what the barriers
cost. The real layer adds attention and the epilogues; this bounds the part the weights account for.

    python bench/layer_stream.py [--shapes 7B,1.5B]
"""
import argparse
import itertools

import torch
import triton
import triton.language as tl

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms
from read_ceiling import read_sum_kernel, stream_bytes

WEIGHTS = ("qkv", "o", "gate_up", "down")


@triton.jit
def _read_phase(p, n, acc, pid, G, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    for i in tl.range(pid * BLOCK, n, G * BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _grid_barrier(p_count, target):
    """Wait until ``target`` arrivals were counted (the count only grows within a launch)."""
    arrived = tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(p_count, 0, sem="acquire", scope="gpu")


@triton.jit
def layer_read_kernel(p0, n0, p1, n1, p2, n2, p3, n3, p_count, p_sink, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                      BARRIERS: tl.constexpr):
    """Read four buffers in turn, each grid-strided over all programs; with ``BARRIERS`` every program waits for
    all others between buffers. ``p_count`` [2] int32: the barrier count and the exit count; the last program
    to leave resets both for the next launch (graph replays included)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    acc = _read_phase(p0, n0, acc, pid, G, BLOCK, STAGES)
    if BARRIERS:
        _grid_barrier(p_count, G)
    acc = _read_phase(p1, n1, acc, pid, G, BLOCK, STAGES)
    if BARRIERS:
        _grid_barrier(p_count, 2 * G)
    acc = _read_phase(p2, n2, acc, pid, G, BLOCK, STAGES)
    if BARRIERS:
        _grid_barrier(p_count, 3 * G)
    acc = _read_phase(p3, n3, acc, pid, G, BLOCK, STAGES)
    left = tl.atomic_add(p_count + 1, 1, sem="acq_rel", scope="gpu") + 1
    if left == G:
        tl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(p_count + 1, 0, sem="relaxed", scope="gpu")
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


def layer_read(bufs, count, sink, grid: int, block: int, stages: int, warps: int, barriers: bool):
    args = [a for b in bufs for a in (b, b.numel())]
    layer_read_kernel[(grid,)](*args, count, sink, BLOCK=block, STAGES=stages, BARRIERS=barriers, num_warps=warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--per-sm", default="1,2")
    ap.add_argument("--blocks", default="4096,16384")
    ap.add_argument("--stages", default="2,4")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = "python bench/layer_stream.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    sink = torch.zeros(1, device=DEVICE)
    count = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    configs = list(itertools.product(*(map(int, getattr(args, a).split(",")) for a in ("per_sm", "blocks", "stages"))))
    print(f"{'shape':5} {'MB':>6} {'floor us':>8} {'kernels':>8} {'barriers':>8} {'stream':>7}   per layer, best of "
          f"{len(configs)} configs each")
    for shape in args.shapes.split(","):
        sizes = stream_bytes(SHAPES[shape])
        layer_bytes = sum(sizes[w] for w in WEIGHTS)
        copies = copies_beyond_l2(layer_bytes)
        layers = [[torch.empty(sizes[w] // 2, dtype=torch.bfloat16, device=DEVICE).normal_() for w in WEIGHTS]
                  for _ in range(copies)]
        floor_us = layer_bytes / bw / 1e3
        best, timed = {}, {}
        for kind, (per_sm, block, stages) in itertools.product(("kernels", "barriers", "stream"), configs):
            if kind == "barriers" and per_sm > 1:
                continue            # a second program per SM need not be resident (shared memory): a deadlock
            grid = per_sm * sms
            if kind == "kernels":
                def fn(i, grid=grid, block=block, stages=stages):
                    for b in layers[i]:
                        read_sum_kernel[(grid,)](b, b.numel(), sink, BLOCK=block, STAGES=stages, num_warps=4)
            else:
                def fn(i, grid=grid, block=block, stages=stages, barriers=kind == "barriers"):
                    layer_read(layers[i], count, sink, grid, block, stages, 4, barriers)
            t = rotating_graph_ms(fn, copies, reps=4, iters=15) * 1e3
            timed[f"{kind},{per_sm},{block},{stages}"] = t
            if kind not in best or t < best[kind][0]:
                best[kind] = (t, per_sm, block, stages)
        assert int(count.sum()) == 0, "the barrier counts were not reset at the end of a launch"
        record("layer_stream", shape=shape, layer_bytes=layer_bytes, floor_us=floor_us, copy_GBps=bw,
               best_us={k: v[0] for k, v in best.items()}, best_config={k: v[1:] for k, v in best.items()},
               variants_us=timed, command=command)
        print(f"{shape:5} {layer_bytes / 1e6:6.1f} {floor_us:8.1f} {best['kernels'][0]:8.1f} {best['barriers'][0]:8.1f} "
              f"{best['stream'][0]:7.1f}   configs (per SM, block, stages): "
              + ", ".join(f"{k} {v[1:]}" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
