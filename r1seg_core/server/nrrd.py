"""CTs and masks as NRRD bytes, for both ends of the wire (SimpleITK reads and writes only files, so
each conversion goes through a private temporary folder that is always removed)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidInputError
from ..volume import Volume, read_volume
from .protocol import check_nrrd


def volume_to_nrrd_bytes(volume: Volume, compress: bool = False) -> bytes:
    """Voxels and geometry as one attached NRRD file; gzip pays off only over a real network."""
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = os.path.join(folder, "ct.nrrd")
        sitk.WriteImage(volume.to_sitk(), path, useCompression=compress)
        return Path(path).read_bytes()


def volume_from_nrrd_bytes(data: bytes, name: str = "") -> Volume:
    """A checked CT from NRRD bytes; raises ValueError (the reason) or the reader's InvalidInputError."""
    check_nrrd(data)
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = Path(folder) / "ct.nrrd"
        path.write_bytes(data)
        try:
            volume = read_volume(path)
        except InvalidInputError as error:
            # The reader names the file; the client knows it as its upload, not as a server path.
            raise InvalidInputError(str(error).replace(str(path), "the uploaded NRRD")) from None
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, name or volume.name)


def mask_from_nrrd_bytes(data: bytes) -> np.ndarray:
    """A mask the server sent, as a (z, y, x) uint8 array."""
    check_nrrd(data)
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = os.path.join(folder, "mask.nrrd")
        Path(path).write_bytes(data)
        return sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.uint8, copy=False)
