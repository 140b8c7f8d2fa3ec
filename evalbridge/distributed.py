"""Data parallelism the way lm-eval's own models do it: under ``torchrun`` / ``accelerate launch`` each
process evaluates its share of the requests and the harness gathers results through these collectives."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        import torch.distributed as td

        t = tensor.to(self._device()).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        td.all_gather(parts, t)
        return torch.stack(parts) if t.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size if self.rank == dst else None
        td.gather_object(obj, out, dst=dst)
        return out

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier()

    def _device(self):
        import torch.distributed as td

        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")


def setup() -> Dist:
    """Join the process group that torchrun / accelerate describe in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as td

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() > local
        if use_nccl:
            torch.cuda.set_device(local)
        td.init_process_group(backend="nccl" if use_nccl else "gloo")
        atexit.register(_leave_process_group)
    return Dist(rank=rank, world_size=world, local_rank=local)


def _leave_process_group() -> None:
    """Destroy the group this process joined before the interpreter exits: left to the interpreter's teardown,
    gloo's worker threads were at times destroyed while running, which aborts the process ("terminate called
    without an active exception") after its results were written, and srun then ends the whole job step."""
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()
