"""The server process's memory: the CTs it keeps lie outside malloc's heap, and what a question freed goes back.

WHY: a long-running server grew by 6 to 11 MiB per answered question (15 MiB CTs, one question each) while its live
arrays stayed at the 4 stored CTs and malloc's in-use bytes stayed flat: the growth was free heap memory. glibc serves
a block below its mmap threshold from a heap arena, and that threshold rises to the size of each large block freed (up
to 32 MiB), so CTs and a question's buffers below 32 MiB soon all come from the heap. A stored CT lives across several
questions; the blocks around it are freed and reallocated at other sizes, and a heap gives back memory only at its top,
so the holes stayed resident and the heap kept growing. Two measures, each measured on its own:
- a stored CT gets an anonymous mapping of its own (`mapped_copy`): nothing long-lived sits in the heap, and the RSS
  stays flat (it grew by 56 MiB over 8 more CTs before);
- after each question the free heap pages go back to the system (`return_free_heap_memory`, glibc's malloc_trim):
  about 60 MiB less RSS at a flat level.
Pinning the mmap threshold (mallopt) flattens the RSS too, but makes every large activation a fresh mapping: 10-15 %
slower questions on a CPU.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import platform

import numpy as np

_GLIBC = ctypes.CDLL(None) if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else None


def mapped_copy(array: np.ndarray) -> np.ndarray:
    """A copy of `array` in an anonymous memory mapping of its own, given back to the system when the copy is freed."""
    try:
        mapping = mmap.mmap(-1, max(1, array.nbytes))
    except OSError as error:
        if error.errno != errno.ENOMEM:
            raise
        # Out of memory, as a malloc'd copy would say it: callers answer MemoryError (the server: 507), not OSError.
        raise MemoryError(f"cannot map {array.nbytes} bytes for a copy of the CT") from None
    copy = np.frombuffer(mapping, dtype=array.dtype, count=array.size).reshape(array.shape)
    copy[...] = array
    return copy


def return_free_heap_memory() -> None:
    """Give the heap's free pages back to the system (glibc; other C libraries are left as they are)."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)
