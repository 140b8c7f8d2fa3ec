"""How long a dependent kernel waits after its producer ends, with and without programmatic dependent launch
(kernels/launch.py), eagerly and inside a CUDA graph.

Kernel A spins for 20 us on every SM (and, in the "trigger" case, allows its dependents to launch at once);
kernel B records the global timer when it starts and when it passes its PDL wait. One JSON line per case in
``bench/results/pdl_gap.jsonl``: B's start and B's first useful instruction relative to A's last one.

    python bench/pdl_gap.py
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from common import DEVICE, record


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def producer_kernel(p_t, ns, TRIGGER: tl.constexpr):
    pid = tl.program_id(0)
    t0 = _now()
    if TRIGGER:
        gdc_launch_dependents()
    t = t0
    while t - t0 < ns:
        t = _now()
    tl.store(p_t + pid * 2, t0)
    tl.store(p_t + pid * 2 + 1, t)


@triton.jit
def consumer_kernel(p_t, PDL: tl.constexpr):
    pid = tl.program_id(0)
    t0 = _now()
    if PDL:
        gdc_wait()
    t1 = _now()
    tl.store(p_t + pid * 2, t0)
    tl.store(p_t + pid * 2 + 1, t1)


def measure(pdl: bool, trigger: bool, graph: bool, reps: int = 20) -> dict:
    grid = torch.cuda.get_device_properties(0).multi_processor_count
    ta = torch.zeros(grid * 2, dtype=torch.int64, device=DEVICE)
    tb = torch.zeros_like(ta)

    def pair():
        producer_kernel[(grid,)](ta, 20000, TRIGGER=trigger, num_warps=1)
        consumer_kernel[(grid,)](tb, PDL=pdl, num_warps=1, launch_pdl=pdl)

    pair()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            pair()
    starts, waits = [], []
    for _ in range(reps):
        g.replay() if graph else pair()
        torch.cuda.synchronize()
        a_end = ta[1::2].max().item()
        starts.append((tb[0::2].min().item() - a_end) / 1e3)
        waits.append((tb[1::2].min().item() - a_end) / 1e3)
    starts.sort()
    waits.sort()
    return {"consumer_start_us": starts[reps // 2], "consumer_past_wait_us": waits[reps // 2]}


def main():
    assert DEVICE == "cuda", "needs a GPU"
    print(f"{'launch':22} {'graph':>5} {'B starts':>9} {'B past wait':>12}   (us after A's last instruction)")
    for graph in (False, True):
        for pdl, trigger in ((False, False), (True, False), (True, True)):
            r = measure(pdl, trigger, graph)
            name = "ordinary" if not pdl else "pdl, trigger at start" if trigger else "pdl, no trigger"
            record("pdl_gap", launch=name, cuda_graph=graph, **r, command="python bench/pdl_gap.py")
            print(f"{name:22} {graph!s:>5} {r['consumer_start_us']:9.2f} {r['consumer_past_wait_us']:12.2f}")


if __name__ == "__main__":
    main()
