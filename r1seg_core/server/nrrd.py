"""CTs and masks as NRRD bytes, for both ends of the wire (SimpleITK reads and writes only files, so
each conversion goes through a private temporary folder that is always removed).

An upload is checked from its header before SimpleITK sees it (protocol.check_nrrd: size, spacing, no data
file; volume.check_physical_size: extent), and a gzip payload is inflated here, in bounded steps, into a raw
NRRD: ITK would inflate whatever the stream holds, so a 500 KB gzip bomb could fill gigabytes.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidInputError
from ..volume import Volume, check_physical_size, read_volume
from .protocol import NrrdHeader, check_nrrd, header_field

# Inflated in steps of at most this many bytes (bounded memory for a large CT).
_INFLATE_STEP = 16 << 20
_COMPRESSED_PIECE = 1 << 20


def volume_to_nrrd_bytes(volume: Volume, compress: bool = False) -> bytes:
    """Voxels and geometry as one attached NRRD file; gzip pays off only over a real network."""
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = os.path.join(folder, "ct.nrrd")
        sitk.WriteImage(volume.to_sitk(), path, useCompression=compress)
        return Path(path).read_bytes()


def volume_from_nrrd_bytes(data: bytes, name: str = "", max_decoded_bytes: int | None = None) -> Volume:
    """A checked CT from NRRD bytes; raises ValueError (the reason; protocol.TooLargeError above
    `max_decoded_bytes`) or the reader's InvalidInputError."""
    header = check_nrrd(data, max_decoded_bytes)
    if header.dimension == 3 and header.spacing is not None and len(header.spacing) == 3:
        check_physical_size(header.sizes[::-1], header.spacing, "the uploaded CT")
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = Path(folder) / "ct.nrrd"
        _write_raw_nrrd(data, header, path)
        try:
            volume = read_volume(path)
        except InvalidInputError as error:
            # The reader names the file; the client knows it as its upload, not as a server path.
            raise InvalidInputError(str(error).replace(str(path), "the uploaded NRRD")) from None
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction, name or volume.name)


def _write_raw_nrrd(data: bytes, header: NrrdHeader, path: Path) -> None:
    """The upload as a raw NRRD with LF line ends (ITK reads CRLF headers too, but only the first blank line may end
    one): a gzip payload is inflated to exactly its declared size, and refused if it holds more or less."""
    def is_encoding(line: str) -> bool:
        field = header_field(line)
        return field is not None and field[0] == "encoding"

    lines = ["encoding: raw" if is_encoding(line) else line for line in header.lines]
    with open(path, "wb") as stream:
        stream.write(("\n".join(lines) + "\n\n").encode("latin-1"))
        payload = memoryview(data)[header.data_offset:]
        if header.encoding == "raw":
            stream.write(payload)
            return
        expected, written = header.decoded_bytes, 0
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)   # gzip or zlib framing, as ITK accepts
        try:
            # Input in small pieces (unconsumed_tail is a copy), output in bounded steps.
            for start in range(0, len(payload), _COMPRESSED_PIECE):
                pending = payload[start:start + _COMPRESSED_PIECE]
                while pending and not inflater.eof:
                    # At most one byte more than the declared size is ever inflated.
                    step = min(_INFLATE_STEP, expected - written + 1)
                    written += _write_inflated(stream, inflater.decompress(pending, step), expected - written)
                    pending = inflater.unconsumed_tail
                if inflater.eof:
                    break
            written += _write_inflated(stream, inflater.flush(), expected - written)
        except zlib.error as error:
            raise ValueError(f"the gzip data are corrupt ({error})") from None
        if written != expected or not inflater.eof:
            raise ValueError(f"the gzip data are truncated: they inflate to {written} bytes, the header declares "
                             f"{expected}")


def _write_inflated(stream, chunk: bytes, room: int) -> int:
    if len(chunk) > room:
        raise ValueError("the gzip data inflate to more than the header's sizes and type declare; send the CT as "
                         "written by SimpleITK, Slicer or r1seg")
    stream.write(chunk)
    return len(chunk)


def mask_from_nrrd_bytes(data: bytes) -> np.ndarray:
    """A mask the server sent, as a (z, y, x) uint8 array."""
    check_nrrd(data)
    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = os.path.join(folder, "mask.nrrd")
        Path(path).write_bytes(data)
        return sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.uint8, copy=False)
