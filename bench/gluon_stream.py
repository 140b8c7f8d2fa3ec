"""Probe: can a producer warp keep a layer's weight stream going through its grid barriers?

``bench/layer_stream.py`` (device runs 106-108) found that one kernel reading a layer's four weights with a grid
barrier between them is no faster than four kernels (1.5B 40.3-41.0 against 39.2-39.6 us), while the same reads
without barriers take 33.7-34.2: each barrier drains the phase to its slowest program while the others idle.
A Triton loop cannot keep loads in flight across the barrier (its software pipeline ends with the loop; one chunk
preloaded into registers saved 0.4 us). This kernel (Gluon, Hopper: TMA, mbarriers, warp specialisation) splits
each program in two:

* a producer warp issues TMA copies of the program's tiles of all four weights, in order, into a ring of
  ``STAGES`` shared-memory slots - it waits only for a free slot, never at a grid barrier (the weights do not
  depend on the activations);
* the consumer warps (the default partition) wait for each slot, read and sum the tile, free the slot, and stop
  at a grid barrier after each weight (``--barriers 1``), as a layer kernel's matmuls must.

If the consumer-side barriers then cost little (time near the barrier-free stream), a persistent layer kernel
built this way would recover the drain that separate kernels pay at every dependency. Reported per layer beside
the copy floor; ``python bench/layer_stream.py`` in the same call gives the Triton baselines.

    python bench/gluon_stream.py [--shapes 7B,1.5B] [--stages 4,8,12]
"""
import argparse
import itertools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from common import DEVICE, SHAPES, copies_beyond_l2, copy_bandwidth_gbs, record, rotating_graph_ms
from read_ceiling import stream_bytes

WEIGHTS = ("qkv", "o", "gate_up", "down")
COLS = 128                                   # a weight is read as [n / COLS, COLS] rows; a tile is TILE_R rows
# the TMA load was renamed (same arguments: descriptor, coordinates, barrier, destination)
TMA_LOAD = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _produce(desc, rows, bufs, ready, empty, it, pid, G, TILE_R: gl.constexpr, TILE_BYTES: gl.constexpr):
    STAGES: gl.constexpr = bufs.type.shape[0]
    for t in range(pid, gl.cdiv(rows, TILE_R), G):
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)   # fresh barriers count as freed once
        mbarrier.expect(ready.index(s), TILE_BYTES)
        TMA_LOAD(desc, [t * TILE_R, 0], ready.index(s), bufs.index(s))
        it += 1
    return it


@gluon.jit
def _producer(d0, d1, d2, d3, r0, r1, r2, r3, bufs, ready, empty, TILE_R: gl.constexpr, TILE_BYTES: gl.constexpr):
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    it = 0
    it = _produce(d0, r0, bufs, ready, empty, it, pid, G, TILE_R, TILE_BYTES)
    it = _produce(d1, r1, bufs, ready, empty, it, pid, G, TILE_R, TILE_BYTES)
    it = _produce(d2, r2, bufs, ready, empty, it, pid, G, TILE_R, TILE_BYTES)
    it = _produce(d3, r3, bufs, ready, empty, it, pid, G, TILE_R, TILE_BYTES)


@gluon.jit
def _consume(rows, bufs, ready, empty, it, acc, pid, G, TILE_R: gl.constexpr, layout: gl.constexpr):
    STAGES: gl.constexpr = bufs.type.shape[0]
    for t in range(pid, gl.cdiv(rows, TILE_R), G):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        tile = bufs.index(s).load(layout)
        fence_async_shared()                      # the shared read ordered before the slot's next TMA write
        mbarrier.arrive(empty.index(s), count=1)
        acc += tile.to(gl.float32)
        it += 1
    return it, acc


@gluon.jit
def _grid_barrier(p_count, target):
    arrived = gl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = gl.atomic_add(p_count, 0, sem="acquire", scope="gpu")


@gluon.jit
def _consumer(r0, r1, r2, r3, bufs, ready, empty, p_count, p_sink, BARRIERS: gl.constexpr, TILE_R: gl.constexpr,
              CHECK: gl.constexpr, layout: gl.constexpr):
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    acc = gl.zeros([TILE_R, 128], gl.float32, layout)
    it = 0
    it, acc = _consume(r0, bufs, ready, empty, it, acc, pid, G, TILE_R, layout)
    if BARRIERS:
        _grid_barrier(p_count, G)
    it, acc = _consume(r1, bufs, ready, empty, it, acc, pid, G, TILE_R, layout)
    if BARRIERS:
        _grid_barrier(p_count, 2 * G)
    it, acc = _consume(r2, bufs, ready, empty, it, acc, pid, G, TILE_R, layout)
    if BARRIERS:
        _grid_barrier(p_count, 3 * G)
    it, acc = _consume(r3, bufs, ready, empty, it, acc, pid, G, TILE_R, layout)
    left = gl.atomic_add(p_count + 1, 1, sem="acq_rel", scope="gpu") + 1
    if left == G:                                 # the last to leave resets the counts for the next launch
        gl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")
        gl.atomic_xchg(p_count + 1, 0, sem="relaxed", scope="gpu")
    total = gl.sum(gl.sum(acc, axis=1), axis=0)
    if CHECK:                                     # every program's sum into the sink: the caller compares
        gl.atomic_add(p_sink, total, sem="relaxed", scope="gpu")
    elif total == -1.2345e30:
        gl.store(p_sink, total)


@gluon.jit
def ws_layer_read_kernel(d0, d1, d2, d3, r0, r1, r2, r3, p_count, p_sink, STAGES: gl.constexpr,
                         TILE_R: gl.constexpr, BARRIERS: gl.constexpr, CHECK: gl.constexpr, num_warps: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    bufs = gl.allocate_shared_memory(d0.dtype, [STAGES, TILE_R, 128], d0.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    TILE_BYTES: gl.constexpr = TILE_R * 128 * 2
    gl.warp_specialize([
        (_consumer, (r0, r1, r2, r3, bufs, ready, empty, p_count, p_sink, BARRIERS, TILE_R, CHECK, layout)),
        (_producer, (d0, d1, d2, d3, r0, r1, r2, r3, bufs, ready, empty, TILE_R, TILE_BYTES)),
    ], [1], [40])


def descriptors(bufs, tile_r: int):
    layout = gl.NVMMASharedLayout.get_default_for([tile_r, COLS], gl.bfloat16)
    views = [b.view(-1, COLS) for b in bufs]
    return [TensorDescriptor.from_tensor(v, [tile_r, COLS], layout) for v in views], [v.shape[0] for v in views]


def ws_layer_read(descs, rows, count, sink, grid: int, stages: int, tile_r: int, barriers: bool, check: bool = False,
                  warps: int = 4):
    ws_layer_read_kernel[(grid,)](*descs, *rows, count, sink, STAGES=stages, TILE_R=tile_r, BARRIERS=barriers,
                                  CHECK=check, num_warps=warps, maxnreg=168)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B,1.5B")
    ap.add_argument("--stages", default="4,8,12")
    ap.add_argument("--tile-rows", default="64")
    args = ap.parse_args()
    assert DEVICE == "cuda", "needs a GPU"
    command = "python bench/gluon_stream.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth_gbs()
    sink = torch.zeros(1, device=DEVICE)
    count = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    print(f"{'shape':5} {'MB':>6} {'floor us':>8} {'barriers':>8} {'stream':>8}   (stages, tile rows) of the best; "
          "per layer")
    for shape in args.shapes.split(","):
        sizes = stream_bytes(SHAPES[shape])
        layer_bytes = sum(sizes[w] for w in WEIGHTS)
        copies = copies_beyond_l2(layer_bytes)
        layers = [[torch.empty(sizes[w] // 2, dtype=torch.bfloat16, device=DEVICE).normal_() for w in WEIGHTS]
                  for _ in range(copies)]
        ones_layer = [torch.ones_like(b) for b in layers[0]]
        floor_us = layer_bytes / bw / 1e3
        best, timed = {}, {}
        for barriers, stages, tile_r in itertools.product((True, False), map(int, args.stages.split(",")),
                                                          map(int, args.tile_rows.split(","))):
            kind = "barriers" if barriers else "stream"
            descs = [descriptors(layer, tile_r) for layer in layers]
            ones = descriptors(ones_layer, tile_r)

            def fn(i, stages=stages, tile_r=tile_r, barriers=barriers, descs=descs):
                ws_layer_read(descs[i][0], descs[i][1], count, sink, sms, stages, tile_r, barriers)
            try:
                # first a launch over all-ones weights that sums every element it read: the stream covers each
                # weight exactly once (a tile missed or read twice moves the count by 8192 or more)
                sink.zero_()
                ws_layer_read(ones[0], ones[1], count, sink, sms, stages, tile_r, barriers, check=True)
                n = sum(b.numel() for b in layers[0])
                assert abs(float(sink) - n) <= 2e-5 * n, f"read {float(sink):.0f} elements, expected {n}"
                t = rotating_graph_ms(fn, copies, reps=4, iters=15) * 1e3
            except Exception as e:  # noqa: BLE001 - a variant this Triton cannot build: report, go on
                print(f"  {kind} stages {stages} tile {tile_r}: {type(e).__name__}: " + " | ".join(str(e).splitlines()[-12:])[:1500])
                continue
            timed[f"{kind},{stages},{tile_r}"] = t
            if kind not in best or t < best[kind][0]:
                best[kind] = (t, stages, tile_r)
        assert int(count.sum()) == 0, "the barrier counts were not reset at the end of a launch"
        if not best:
            continue
        record("gluon_stream", shape=shape, layer_bytes=layer_bytes, floor_us=floor_us, copy_GBps=bw,
               best_us={k: v[0] for k, v in best.items()}, best_config={k: v[1:] for k, v in best.items()},
               variants_us=timed, command=command)
        print(f"{shape:5} {layer_bytes / 1e6:6.1f} {floor_us:8.1f} "
              + " ".join(f"{best[k][0]:8.1f}" if k in best else f"{'-':>8}" for k in ("barriers", "stream"))
              + "   " + ", ".join(f"{k} {v[1:]}" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
