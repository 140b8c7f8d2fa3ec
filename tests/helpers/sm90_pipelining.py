"""Compile a kernel launch for Hopper (sm_90) on a machine without a GPU and report whether its loops were
software-pipelined - loads issued as asynchronous copies into shared memory, several iterations ahead.

A weight- or KV-streaming kernel lives on that pipelining: without it each loop iteration waits a memory latency.
It is lost silently - an atomic or a nested loop inside the loop body, or a load whose address Triton cannot
follow, makes the compiler leave the loop as it is, and the kernel still computes the right numbers (a persistent
linear whose loop held atomics compiled with no asynchronous copy, and so did a one-loop decode attention).
The launch is captured from the kernel's own Python wrapper, called on CPU
tensors of the real shapes, and compiled with what a GPU launch would specialise: 16-byte aligned pointers,
integer arguments equal to 1 as constants, multiples of 16 marked so.

Run as a script (``python -m tests.helpers.sm90_pipelining [CASE ...]``, all cases by default) with
``TRITON_INTERPRET`` unset - under the interpreter ``triton.jit`` builds no compilable kernels; it prints one
JSON object per launch.
"""
from __future__ import annotations

import json
import re
import sys

import torch

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.uint8: "*u8"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "grid", "warmup")


def capture_launches(kernels: list, call) -> list:
    """Run ``call()`` with each kernel's launch replaced by a recorder; returns (kernel, args, kwargs) per launch."""
    launches = []
    for kern in kernels:
        kern.run = (lambda k: lambda *args, **kwargs: launches.append((k, args, kwargs)))(kern)
    try:
        call()
    finally:
        for kern in kernels:
            del kern.run
    return launches


def compile_sm90(kern, args: tuple, kwargs: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = dict(zip(kern.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    no_spec = {kern.arg_names[i] if isinstance(i, int) else i for i in (kern.do_not_specialize or ())}
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kern.arg_names, kern.params)):
        v = values[name]
        if param.is_constexpr or v is None:
            signature[name], constants[name] = "constexpr", v
        elif torch.is_tensor(v):
            signature[name] = _PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif name in no_spec:
            signature[name] = "i32"
        elif v == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(v) < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    compiled = triton.compile(ASTSource(fn=kern, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ttgir = compiled.asm["ttgir"]
    return {"kernel": kern.__name__, "num_stages": options.get("num_stages"),
            "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
            "shared_bytes": compiled.metadata.shared,
            "cp_async_ptx": len(re.findall(r"cp\.async\.(?:cg|ca)", compiled.asm["ptx"])),
            "wgmma_ptx": len(re.findall(r"wgmma\.mma_async", compiled.asm["ptx"])),
            "mma_sync_ptx": len(re.findall(r"\bmma\.sync", compiled.asm["ptx"]))}


H100 = "NVIDIA H100 80GB HBM3"


def _linear_case(tokens: int, projection: str, num_stages: int | None = None, swap_ab: bool | None = None):
    """The 7B decode linear as the triton backend runs it (tuned H100 configuration; ``num_stages`` overrides
    its pipelining depth - 1 leaves the loop unpipelined, the check's control; ``swap_ab`` its operand order,
    with at least 64 weight rows a tile when swapped)."""
    import dataclasses

    from fastdllm_kernels.linear import kernel as lk
    from fastdllm_kernels.linear.configs import pick_config, pick_strategy

    d, inter = 3584, 18944
    n, k, kw = {"gate_up": (inter, d, dict(swiglu=True, row_rms=True)),
                "down": (d, inter, dict(residual=torch.empty(tokens, d, dtype=torch.bfloat16)))}[projection]
    x = torch.empty(tokens, k, dtype=torch.bfloat16)
    w = torch.empty(n * (2 if kw.get("swiglu") else 1), k, dtype=torch.bfloat16)
    cfg = pick_config(tokens, n, k, kw.get("swiglu", False), 132, H100)
    if pick_strategy(tokens, n, k, kw.get("swiglu", False), H100) == "norm_then_fused":
        kw.pop("row_rms", None)                 # a norm kernel runs first; the fused linear gets normalised rows
    if num_stages is not None:
        cfg = dataclasses.replace(cfg, num_stages=num_stages)
    if swap_ab is not None:
        cfg = dataclasses.replace(cfg, swap_ab=swap_ab, block_n=max(64, cfg.block_n) if swap_ab else cfg.block_n)
    return [lk.fused_linear_kernel], lambda: lk.fused_linear(x, w, config=cfg, **kw)


def _qkv_rope_case(tokens: int, shape: str):
    """A decode layer's QKV projection with its RoPE / KV-write epilogue (the H100's configuration for the
    shape, or the derived one where the table runs it separately)."""
    from fastdllm_kernels.linear import qkv_rope as qr
    from fastdllm_kernels.linear.configs import derived_qkv_rope_config, pick_qkv_rope

    hidden, hq, hkv, d = {"7B": (3584, 28, 4, 128), "1.5B": (1536, 12, 2, 128)}[shape]
    n = (hq + 2 * hkv) * d
    x = torch.empty(tokens, hidden, dtype=torch.bfloat16)
    w, b = torch.empty(n, hidden, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    cos = sin = torch.empty(4096, d, dtype=torch.bfloat16)
    meta = [torch.zeros(tokens, dtype=torch.long) for _ in range(3)]
    pk, pv = (torch.empty(1, hkv, 4096, d, dtype=torch.bfloat16) for _ in range(2))
    bk, bv = (torch.empty(1, hkv, 32, d, dtype=torch.bfloat16) for _ in range(2))
    cfg = pick_qkv_rope(tokens, n, hidden, 132, H100)[1] or derived_qkv_rope_config(tokens, n, hidden, 132)
    return [qr.qkv_rope_kernel], lambda: qr.qkv_rope_write(x, w, b, 1e-6, hq, hkv, cos, sin, *meta, pk, pv, bk, bv,
                                                           config=cfg)


def _decode_attention_case(queries: int, prefix: int):
    """One 7B layer's decode attention at batch 1 (GQA 7:1, head_dim 128)."""
    from fastdllm_kernels.attention import kernel as ak

    hq, hkv, d = 28, 4, 128
    q = torch.empty(queries, hq, d, dtype=torch.bfloat16)
    pk, pv = (torch.empty(1, hkv, prefix + 64, d, dtype=torch.bfloat16) for _ in range(2))
    bk, bv = (torch.empty(1, hkv, 32, d, dtype=torch.bfloat16) for _ in range(2))
    meta = [torch.zeros(1, dtype=torch.long), torch.tensor([prefix]), torch.ones(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long)]
    return ([ak.decode_attention_fwd_kernel, ak.decode_attention_combine_kernel],
            lambda: ak.decode_attention(q, pk, pv, bk, bv, *meta, n_q=queries, scale=d ** -0.5))


def _prefill_attention_case(tokens: int = 512, prefix: int = 2048):
    """A 7B scoring forward's attention: a 512-token window after a 2048-token prefix cache."""
    from fastdllm_kernels.attention import kernel as ak

    hq, hkv, d = 28, 4, 128
    q = torch.empty(tokens, hq, d, dtype=torch.bfloat16)
    k, v = (torch.empty(tokens, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    pk, pv = (torch.empty(1, hkv, prefix, d, dtype=torch.bfloat16) for _ in range(2))
    meta = torch.zeros(1, dtype=torch.long), torch.tensor([prefix]), torch.tensor([0, tokens])
    return ([ak.prefill_attention_fwd_kernel],
            lambda: ak.prefill_attention(q, k, v, pk, pv, *meta, tokens, d ** -0.5, 32))


def _gpu_tiles(kern, kwargs: dict) -> dict:
    """The captured launch with the tiles a GPU launch would use (the prefill wrapper picks smaller tiles for
    CPU tensors, for the interpreter's speed)."""
    from fastdllm_kernels.attention import kernel as ak

    if kern is ak.prefill_attention_fwd_kernel:
        tile = ak.prefill_tile(kwargs["D"], "cuda")
        return {**kwargs, "BLOCK_M": tile, "BLOCK_N": tile}
    return kwargs


CASES = {"linear_gate_up_8": lambda: _linear_case(8, "gate_up"),
         "linear_gate_up_32": lambda: _linear_case(32, "gate_up"),
         "linear_down_8": lambda: _linear_case(8, "down"), "linear_down_32": lambda: _linear_case(32, "down"),
         "linear_gate_up_8_one_stage": lambda: _linear_case(8, "gate_up", num_stages=1),
         "linear_down_32_swapped": lambda: _linear_case(32, "down", swap_ab=True),
         "linear_down_32_unswapped": lambda: _linear_case(32, "down", swap_ab=False),
         "qkv_rope_7B_8": lambda: _qkv_rope_case(8, "7B"), "qkv_rope_7B_32": lambda: _qkv_rope_case(32, "7B"),
         "qkv_rope_1.5B_8": lambda: _qkv_rope_case(8, "1.5B"),
         "qkv_rope_1.5B_32": lambda: _qkv_rope_case(32, "1.5B"),
         "decode_attention_32": lambda: _decode_attention_case(32, 2048),
         "decode_attention_8": lambda: _decode_attention_case(8, 8192),
         "prefill_attention": _prefill_attention_case}


def main(cases: list[str]):
    for case in cases:
        kernels, call = CASES[case]()
        for kern, args, kwargs in capture_launches(kernels, call):
            print(json.dumps({"case": case, **compile_sm90(kern, args, _gpu_tiles(kern, kwargs))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
