"""Which CT an answer is about: the predictor's cache and a conversation's stored masks are keyed by it."""
from __future__ import annotations

import hashlib
import zlib

import numpy as np


def volume_fingerprint(volume) -> bytes:
    """Voxels and geometry: the same CT handed over again (e.g. from Slicer) is recognised, an edited one is not.

    The voxels' CRC-32 is paid on every question, at a tenth of a cryptographic hash's cost: it catches every edit
    of one voxel and misses a larger edit with probability 2**-32, and nobody gains by forging a CT against their
    own cache. The geometry is compared as it is.
    """
    voxels = np.ascontiguousarray(volume.array).view(np.uint8).reshape(-1)
    geometry = str((volume.array.dtype, volume.array.shape, volume.spacing, volume.origin)).encode()
    return zlib.crc32(voxels).to_bytes(4, "little") + geometry + np.asarray(volume.direction, dtype=np.float64).tobytes()


def fingerprint_text(fingerprint: bytes) -> str:
    """The fingerprint as the short text a conversation file stores."""
    return hashlib.sha256(fingerprint).hexdigest()


def ct_fingerprint(volume) -> str:
    return fingerprint_text(volume_fingerprint(volume))
