"""Probe: what would one kernel per layer save on the weight stream alone?

A decode layer launches its projections as separate kernels (QKV, O, gate/up, down, with RoPE and attention in
between); each one starts cold - launch, first loads, ramp - and drains alone (bench/read_ceiling.py: a plain
read of the 1.5B's 4.7 MB O weight takes 3.8 us for 1.6 us of bytes). A persistent layer kernel would stream
the four weights back to back, with a grid-wide barrier wherever a projection needs the previous one's output.
Before building one, this script times that stream's reading alone, per layer (CUDA graphs over rotating
copies of a layer's four weights, together > 3 x L2, so every read is cold), three ways:

* ``kernels``: four plain read kernels, one per weight (the launch structure the runtime has now);
* ``kernels_prefetch``: the same, but each program, once its own reads are done, loads the chunks the next
  kernel's program of the same index will load first (the next weight's, or the next layer's QKV after
  down): the drain of one kernel pulls the next one's first tiles into L2, so its ramp starts warm;
* ``barriers``: one kernel reading the four weights in turn, a grid-wide barrier between them (the persistent
  layer kernel's dependency structure; every program resident, so the barrier cannot deadlock);
* ``barriers_preload``: the same, each program loading its first chunk of the next weight before it waits
  (what a layer kernel can do in Triton: a load into registers issued ahead of the barrier);
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
KINDS = ("kernels", "kernels_prefetch", "barriers", "barriers_preload", "stream")


@triton.jit
def _read_phase(p, n, acc, start, G, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Add chunks ``start``, ``start + G``, ... of ``p`` (chunks of ``BLOCK`` elements) into ``acc``."""
    for i in tl.range(start * BLOCK, n, G * BLOCK, num_stages=STAGES):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
    return acc


@triton.jit
def read_prefetch_kernel(p, n, p_next, n_next, p_sink, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                         PREFETCH: tl.constexpr):
    """``read_sum_kernel``, then the first ``PREFETCH`` chunks this program index reads of ``p_next`` (kept live
    in the sum, so the loads are issued; they go through, and stay in, the L2)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = _read_phase(p, n, tl.zeros([BLOCK], tl.float32), pid, G, BLOCK, STAGES)
    for j in tl.static_range(PREFETCH):
        offs = (pid + j * G) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(p_next + offs, mask=offs < n_next, other=0.0).to(tl.float32)
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


@triton.jit
def _grid_barrier(p_count, target):
    """Wait until ``target`` arrivals were counted (the count only grows within a launch)."""
    arrived = tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(p_count, 0, sem="acquire", scope="gpu")


@triton.jit
def _cross(p_count, target, p_next, n_next, acc, pid, G, BARRIERS: tl.constexpr, BLOCK: tl.constexpr):
    """Between two weights: with ``BARRIERS`` 1 wait at the grid barrier; with 2 first issue the load of this
    program's first chunk of the next weight, then wait, then use it (the read runs across the barrier).
    Returns the accumulator and the chunk the next weight's loop starts at."""
    start = pid
    if BARRIERS == 2:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        first = tl.load(p_next + offs, mask=offs < n_next, other=0.0)
        _grid_barrier(p_count, target)
        acc += first.to(tl.float32)
        start = pid + G
    elif BARRIERS == 1:
        _grid_barrier(p_count, target)
    return acc, start


@triton.jit
def layer_read_kernel(p0, n0, p1, n1, p2, n2, p3, n3, p_count, p_sink, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                      BARRIERS: tl.constexpr):
    """Read four buffers in turn, each grid-strided over all programs; ``BARRIERS`` 1: every program waits for
    all others between buffers; 2: the same, with each program's first chunk of the next buffer loaded before
    it waits (``_cross``). ``p_count`` [2] int32: the barrier count and the exit count; the last program to
    leave resets both for the next launch (graph replays included)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    acc = _read_phase(p0, n0, acc, pid, G, BLOCK, STAGES)
    acc, start = _cross(p_count, G, p1, n1, acc, pid, G, BARRIERS, BLOCK)
    acc = _read_phase(p1, n1, acc, start, G, BLOCK, STAGES)
    acc, start = _cross(p_count, 2 * G, p2, n2, acc, pid, G, BARRIERS, BLOCK)
    acc = _read_phase(p2, n2, acc, start, G, BLOCK, STAGES)
    acc, start = _cross(p_count, 3 * G, p3, n3, acc, pid, G, BARRIERS, BLOCK)
    acc = _read_phase(p3, n3, acc, start, G, BLOCK, STAGES)
    left = tl.atomic_add(p_count + 1, 1, sem="acq_rel", scope="gpu") + 1
    if left == G:
        tl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(p_count + 1, 0, sem="relaxed", scope="gpu")
    s = tl.sum(acc)
    if s == -1.2345e30:
        tl.store(p_sink, s)


def layer_read(bufs, count, sink, grid: int, block: int, stages: int, warps: int, barriers: int):
    args = [a for b in bufs for a in (b, b.numel())]
    layer_read_kernel[(grid,)](*args, count, sink, BLOCK=block, STAGES=stages, BARRIERS=barriers, num_warps=warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--per-sm", default="1,2")
    ap.add_argument("--blocks", default="4096,16384")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--prefetch", type=int, default=2, help="chunks of the next weight each program prefetches")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = "python bench/layer_stream.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    sink = torch.zeros(1, device=DEVICE)
    count = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    configs = list(itertools.product(*(map(int, getattr(args, a).split(",")) for a in ("per_sm", "blocks", "stages"))))
    print(f"{'shape':5} {'MB':>6} {'floor us':>8} " + " ".join(f"{k:>16}" for k in KINDS)
          + f"   per layer, best of {len(configs)} configs each")
    for shape in args.shapes.split(","):
        sizes = stream_bytes(SHAPES[shape])
        layer_bytes = sum(sizes[w] for w in WEIGHTS)
        copies = copies_beyond_l2(layer_bytes)
        layers = [[torch.empty(sizes[w] // 2, dtype=torch.bfloat16, device=DEVICE).normal_() for w in WEIGHTS]
                  for _ in range(copies)]
        floor_us = layer_bytes / bw / 1e3
        best, timed = {}, {}
        for kind, (per_sm, block, stages) in itertools.product(KINDS, configs):
            if kind.startswith("barriers") and per_sm > 1:
                continue            # a second program per SM need not be resident (shared memory): a deadlock
            grid = per_sm * sms
            if kind == "kernels":
                def fn(i, grid=grid, block=block, stages=stages):
                    for b in layers[i]:
                        read_sum_kernel[(grid,)](b, b.numel(), sink, BLOCK=block, STAGES=stages, num_warps=4)
            elif kind == "kernels_prefetch":
                def fn(i, grid=grid, block=block, stages=stages):
                    nexts = layers[i][1:] + [layers[(i + 1) % copies][0]]
                    for b, nb in zip(layers[i], nexts):
                        read_prefetch_kernel[(grid,)](b, b.numel(), nb, nb.numel(), sink, BLOCK=block, STAGES=stages,
                                                      PREFETCH=args.prefetch, num_warps=4)
            else:
                def fn(i, grid=grid, block=block, stages=stages,
                       barriers={"barriers": 1, "barriers_preload": 2, "stream": 0}[kind]):
                    layer_read(layers[i], count, sink, grid, block, stages, 4, barriers)
            t = rotating_graph_ms(fn, copies, reps=4, iters=15) * 1e3
            timed[f"{kind},{per_sm},{block},{stages}"] = t
            if kind not in best or t < best[kind][0]:
                best[kind] = (t, per_sm, block, stages)
        assert int(count.sum()) == 0, "the barrier counts were not reset at the end of a launch"
        record("layer_stream", shape=shape, layer_bytes=layer_bytes, floor_us=floor_us, copy_GBps=bw,
               best_us={k: v[0] for k, v in best.items()}, best_config={k: v[1:] for k, v in best.items()},
               variants_us=timed, command=command)
        print(f"{shape:5} {layer_bytes / 1e6:6.1f} {floor_us:8.1f} " + " ".join(f"{best[k][0]:16.1f}" for k in KINDS)
              + "   configs (per SM, block, stages): "
              + ", ".join(f"{k} {v[1:]}" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
