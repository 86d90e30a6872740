"""Process-group setup and the few collectives the training loop needs.

Started by the DeepSpeed launcher (`deepspeed` / `python -m deepspeed.launcher.runner`), which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process, on one node or many (hostfile); or by
srun, one task per GPU (slurm/two_nodes.sbatch), whose SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS stand in for
the first three. GPUs talk over NCCL; CPU runs (tests, smoke runs) over gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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


# A collective that waits longer than this fails the job: a dead node then ends it in minutes instead of hanging.
# Raise it when ranks legitimately wait longer (a slow filesystem while 16 ranks load an 8B model).
TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S = "R1SEG_COLLECTIVE_TIMEOUT_S", 600
_FROM_SLURM = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}


def rank_environment(environ: dict[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK and WORLD_SIZE to set for a task srun started without a launcher; {} when a launcher set them."""
    if any(name in environ for name in _FROM_SLURM) or not all(slurm in environ for slurm in _FROM_SLURM.values()):
        return {}
    values = {name: environ[slurm] for name, slurm in _FROM_SLURM.items()}
    if int(values["WORLD_SIZE"]) > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= set(environ):
        raise RuntimeError("started by srun without MASTER_ADDR and MASTER_PORT: launch through training/run_stages.sh "
                           "--srun (slurm/two_nodes.sbatch), which sets them from the allocation")
    return values


def collective_timeout(environ: dict[str, str]) -> timedelta:
    raw = environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_VARIABLE}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def init_distributed() -> Ranks:
    import deepspeed
    import deepspeed.ops

    os.environ.update(rank_environment(dict(os.environ)))
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
    deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout(dict(os.environ)))
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the ranks, in one collective."""
    bounds = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    return bounds.tolist()


def require_same_on_all_ranks(value: int, device: torch.device, what: str) -> None:
    """Fail loudly when ranks disagree on `value`: under ZeRO-2 the step would silently mix up gradients."""
    bounds = torch.tensor([value, -value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    if bounds[0] != -bounds[1]:
        raise RuntimeError(f"ranks disagree on {what} ({-bounds[1]:.0f} vs {bounds[0]:.0f}); ZeRO-2 needs the same "
                           "backward graph on every rank, see training/data/samples.py")


def barrier() -> None:
    torch.distributed.barrier()
