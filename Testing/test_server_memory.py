"""The server's memory rules, in process: a fetched answer is held by nothing, and a stored CT lies outside malloc's
heap (r1seg_core/server/memory.py says why; test_server_hostile.py measures the server's RSS over 16 questions)."""
import ctypes
import gc
import platform
import time
import weakref

import numpy as np
import pytest

from test_server import QUESTION
from test_server import model_dir  # noqa: F401  (the fixture: the same tiny model)

from r1seg_core import sample_ct_path
from r1seg_core.server import protocol
from r1seg_core.server.jobs import JobQueue, ModelHost, ServeSettings
from r1seg_core.server.memory import mapped_copy
from r1seg_core.volume import read_volume

FAST = {"sliding_window": False, "global_step": "off"}


def test_a_fetched_answer_is_held_by_nothing(model_dir):
    settings = ServeSettings(model_dir=str(model_dir), device="cpu", threads=1)
    queue = JobQueue(ModelHost(settings), settings)
    try:
        job, _ = queue.submit(question=QUESTION, volume=read_volume(sample_ct_path()), conversation=None,
                              options=FAST, volume_id="sample")
        deadline = time.monotonic() + 120
        while queue.counts != (False, 0):      # the worker lets go of a job under the queue's lock
            assert time.monotonic() < deadline, "the question did not finish in 120 s"
            time.sleep(0.02)
        assert job.state == protocol.DONE, job.error
        masks = [weakref.ref(target.mask) for target in job.result.targets]
        assert masks
        job.mask_fetched(None)                 # the labelmap of all targets was sent
        gc.collect()
        held = sum(mask() is not None for mask in masks)
        assert held == 0, f"{held} of {len(masks)} fetched masks are still held"
        assert job.summary["targets"]          # the answer's text and numbers stay
    finally:
        queue.stop()


class MallocInfo(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h)."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """Bytes malloc has handed out and not got back: heap blocks plus blocks mapped on their own."""
    libc = ctypes.CDLL(None)
    if platform.libc_ver()[0] != "glibc" or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    libc.mallinfo2.restype = MallocInfo
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_a_stored_ct_copy_is_not_taken_from_malloc(dtype):
    array = np.random.default_rng(0).integers(-1000, 1000, size=(64, 128, 128)).astype(dtype)
    before = malloc_in_use()
    plain = array.copy()
    # The measure sees a numpy copy (90 %: another thread of the test process may free a little meanwhile; in a full
    # suite run the copy once showed as 1 KiB short of its size).
    assert malloc_in_use() - before >= 0.9 * array.nbytes
    before = malloc_in_use()
    copy = mapped_copy(array)
    assert malloc_in_use() - before < array.nbytes // 8
    np.testing.assert_array_equal(copy, array)
    assert copy.dtype == array.dtype and copy.flags.c_contiguous and copy.flags.writeable
    assert not np.shares_memory(copy, array)
    del plain


def test_a_copy_the_system_cannot_map_is_a_memory_error():
    """The server answers MemoryError with its 507 "not enough memory"; mmap says ENOMEM as an OSError, which the
    server would report as an unexpected error. 128 TiB (a broadcast view: no memory behind it) is more address space
    than a 64-bit Linux process has."""
    huge = np.broadcast_to(np.zeros(1, np.int16), (2 ** 46,))
    with pytest.raises(MemoryError, match="cannot map 140737488355328 bytes"):
        mapped_copy(huge)
