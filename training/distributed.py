"""Process-group setup and the few collectives the training loop needs.

Started by the DeepSpeed launcher (`deepspeed` / `python -m deepspeed.launcher.runner`), which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process, on one node or many (hostfile).
GPUs talk over NCCL; CPU runs (tests, smoke runs) over gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Ranks:
    import deepspeed
    import deepspeed.ops

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use (4.5 minutes on a
        # 2-core machine) that only its inference path calls; marking it unavailable lets training start at once.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Ranks sharing a CPU would each start one thread per core and fight over them.
        local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend=backend)
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


def require_same_on_all_ranks(value: int, device: torch.device, what: str) -> None:
    """Fail loudly when ranks disagree on `value`: under ZeRO-2 the step would silently mix up gradients."""
    bounds = torch.tensor([value, -value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    if bounds[0] != -bounds[1]:
        raise RuntimeError(f"ranks disagree on {what} ({-bounds[1]:.0f} vs {bounds[0]:.0f}); ZeRO-2 needs the same "
                           "backward graph on every rank, see training/data/samples.py")


def barrier() -> None:
    torch.distributed.barrier()
