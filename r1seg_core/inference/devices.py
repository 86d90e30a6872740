"""Where a question runs: the device and dtype asked for, out-of-memory errors told apart, and time per step."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..errors import InvalidInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# What torch's CPU allocator and SimpleITK say when an allocation fails (both raise a plain RuntimeError).
CPU_OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "Failed to allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in CPU_OUT_OF_MEMORY_SIGNS))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on a CPU, where bf16 halves the memory (a Phi-3-size model: 7.7 instead of
    15 GB) but runs slower on CPUs without bf16 instructions."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose auto, {' or '.join(DTYPES)}")
    return DTYPES[dtype]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: a CUDA GPU, else Apple silicon's GPU (MPS), else the CPU. On MPS the weights stay float32 unless
    --dtype says otherwise, and operations MPS lacks run on the CPU only when PYTORCH_ENABLE_MPS_FALLBACK=1 is set
    before torch is imported (README, "Devices"). MPS could not be tested where this was written (no Mac)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for, but no CUDA GPU is available; use --device cpu or auto")
    if str(device).startswith("mps") and not _mps_available():
        raise InvalidInputError("device 'mps' was asked for, but this PyTorch has no usable Apple-silicon GPU (MPS needs "
                                "macOS 12.3 or later on Apple silicon); use --device cpu or auto")
    return torch.device(device)


class Timings(dict):
    """Seconds per step, summed over windows; waits for the GPU so a step is charged its own kernels."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    @contextmanager
    def __call__(self, step: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self[step] = self.get(step, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
