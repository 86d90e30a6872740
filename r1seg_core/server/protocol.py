"""The wire format of `r1seg serve`, shared by the server and its clients. Standard library only.

A CT travels as the bytes of one attached NRRD file (raw or gzip encoding: voxels plus geometry in a
documented, non-executable format); masks come back the same way; everything else is JSON. Nothing
is ever unpickled: a body that is not NRRD is refused before any reader sees it.

    GET  /health                       {"status", "model": loading|ready|unloaded|failed, "busy", "queued",
                                        "version", "api", "limits", ...}
    GET  /model                        the model card: {"model" (a folder name), "card", "text", "placeholder", "device", ...}
    POST /volumes         NRRD bytes   201 {"volume_id", "shape"}; the id is the SHA-256 of the bytes
    GET  /volumes/{id}                 200 {"volume_id", "shape"} or 404 (upload it, then ask)
    DELETE /volumes/{id}               {"forgotten"}: drop the CT, its finished jobs' data and, when idle, the
                                       model's cached CT
    POST /conversations   {}           201 {"conversation_id"}
    DELETE /conversations/{id}         forget its turns
    POST /jobs            JobRequest   202 {"job_id", "state": "queued"|"running", "position"}
                                       429 {"error": "busy", ...} when MAX_WAITING questions already wait
    GET  /jobs/{id}                    {"state", "done", "total", "stage", "error", "position"}
    GET  /jobs/{id}/events             the same, as server-sent events, until the job ends
    POST /jobs/{id}/cancel {}          {"state"}: queued jobs end at once, a running one at its next step
    GET  /jobs/{id}/result             AnswerResult.to_dict() (409 until the job is done)
    GET  /jobs/{id}/masks/{i}          target i's mask as NRRD (uint8, on the uploaded CT's grid)
    GET  /jobs/{id}/labelmap?format=   all targets as one labelmap: seg.nrrd (default), nrrd, nii.gz, nii, mha
    POST /unload          {}           cancel every job, free the model, CT cache and stored CTs

Every error is JSON: {"error": ERROR_*, "detail": "a sentence naming the problem"}.

Every request may carry `X-R1Seg3D-API: <API_VERSION>`; a server of another protocol version answers 409
{"error": "version_mismatch", "message"}; a request without the header (curl, scripts) is served. Job ids are
random and belong to the client that created them: requests about a job must carry the same `X-R1Seg3D-Client`
value (or none, if it was created without one), else the job does not exist for them (404).
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CancelledError, CheckpointError, InvalidInputError, OutOfMemoryError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8740
DEFAULT_MAX_UPLOAD_MB = 1024
# The largest decoded CT (voxels x bytes per voxel): a whole-body CT of 512 x 512 x 2000 int16 voxels is 1000 MiB.
DEFAULT_MAX_CT_MB = 1024
# The longest a client may take to send its request headers, and the longest a body may stall (r1seg serve
# --request-timeout); a stalled body must also keep moving at BODY_MIN_BYTES per timeout.
DEFAULT_REQUEST_TIMEOUT_S = 30.0
BODY_MIN_BYTES = 64 * 1024
# A finished question's masks stay fetchable this long (r1seg serve --keep-results-s); fetched ones go at once.
DEFAULT_KEEP_RESULTS_S = 600.0

# The protocol's version: a client and a server of different versions refuse each other, naming both.
API_VERSION = 2
API_HEADER = "X-R1Seg3D-API"
# A random value per client process: the jobs it creates are its own (see the module docstring).
CLIENT_HEADER = "X-R1Seg3D-Client"

# The ranges a server accepts per question (POST /jobs), with the engine's own checks behind them. Overlap
# and the window batch are capped harder than the engine's: overlap 0.99 means 19440 windows instead of 44 on
# the sample CT (hours of the only worker), and a batch of every window at once needs gigabytes.
JOB_LIMITS = {"overlap": (0.0, 0.75), "loops": (0, 3), "window_batch": (1, 32), "seed": (0, 2 ** 32 - 1)}
# JSON bodies are a question and a few numbers: anything larger is a mistake or an attack.
MAX_JSON_BYTES = 64 * 1024

JSON_TYPE = "application/json"
NRRD_TYPE = "application/octet-stream"

# Job states; the last three are terminal.
QUEUED, LOADING, RUNNING, DONE, FAILED, CANCELLED = "queued", "loading", "running", "done", "failed", "cancelled"
TERMINAL_STATES = (DONE, FAILED, CANCELLED)

# The `error` field of an error reply, and of a failed job's `error`.
ERROR_BUSY = "busy"
ERROR_UNAUTHORIZED = "unauthorized"
ERROR_FORBIDDEN = "forbidden"
ERROR_TOO_LARGE = "too_large"
ERROR_TIMEOUT = "timeout"
ERROR_VERSION = "version_mismatch"
ERROR_BAD_REQUEST = "bad_request"
ERROR_NOT_FOUND = "not_found"
ERROR_NOT_READY = "not_ready"
ERROR_INVALID_INPUT = "invalid_input"      # the engine refused the CT or the question (r1seg exit code 2)
ERROR_MODEL = "model"                      # the model folder is unusable (exit code 3)
ERROR_OUT_OF_MEMORY = "out_of_memory"      # exit code 4
ERROR_CANCELLED = "cancelled"              # exit code 130
ERROR_ENGINE = "engine"                    # any other engine error (exit code 1)
ERROR_INTERNAL = "internal"                # a bug: the server log has the traceback

# The engine's errors that cross the wire as themselves: the server names the kind, the client raises the
# same class again, so `r1seg ask --server` keeps the local run's exit codes. Any other R1SegError is ERROR_ENGINE.
ENGINE_ERRORS = {ERROR_INVALID_INPUT: InvalidInputError, ERROR_MODEL: CheckpointError,
                 ERROR_OUT_OF_MEMORY: OutOfMemoryError, ERROR_CANCELLED: CancelledError}

# Longest suffix first, so that a client finds ".seg.nrrd" before ".nrrd".
LABELMAP_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nrrd": ".nrrd", "nii": ".nii", "mha": ".mha"}

_NRRD_MAGIC = b"NRRD000"
# A NRRD header ends at the first blank line; real headers are a few hundred bytes.
_MAX_NRRD_HEADER = 64 * 1024


def volume_id(data: bytes) -> str:
    """The id of an uploaded CT: clients can ask whether the server already has it before sending it."""
    return hashlib.sha256(data).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# NRRD voxel types (every spelling the format allows) and their sizes in bytes.
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}
# Fields whose second copy would leave it to the reader which one counts.
_NRRD_SINGLE_FIELDS = ("type", "dimension", "sizes", "encoding", "endian", "spacings", "space directions",
                       "space origin", "byte skip", "line skip")


class TooLargeError(ValueError):
    """A body whose decoded CT would exceed the server's limit (HTTP 413)."""


@dataclass(frozen=True)
class NrrdHeader:
    """What a NRRD header declares, read before any voxel is decoded."""
    lines: tuple            # the header's lines without line ends (the magic first)
    data_offset: int        # where the (possibly compressed) voxel bytes start
    dimension: int
    sizes: tuple            # fastest axis first: (x, y, z) for a CT
    voxel_bytes: int
    encoding: str           # "raw" or "gzip"
    spacing: tuple | None   # per axis, from `spacings` or the lengths of `space directions`

    @property
    def decoded_bytes(self) -> int:
        return math.prod(self.sizes) * self.voxel_bytes


def check_nrrd(data: bytes, max_decoded_bytes: int | None = None) -> NrrdHeader:
    """Refuse anything but one self-contained NRRD file, naming what is wrong (ValueError); return its header.

    A header with a `data file` field would make the reader open any path on the server, so only attached data
    is accepted. A pickle is named as such, because that is the likely mistake. The decoded size is computed
    from `sizes` and `type` and refused above `max_decoded_bytes` (TooLargeError) before anything is decoded:
    a reader allocates what the header declares, so 132 bytes could otherwise cost gigabytes. Spacings that are
    not finite numbers are refused here, because ITK silently reads `nan` as 1 mm."""
    if not data:
        raise ValueError("the body is empty: send the CT as the bytes of a NRRD file")
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ValueError("the body looks like a Python pickle; this server never unpickles anything: send the CT "
                         "as the bytes of a NRRD file")
    if not data.startswith(_NRRD_MAGIC):
        raise ValueError(f"the body is not a NRRD file (it starts with {data[:8]!r}, not 'NRRD000'): send the CT as "
                         "the bytes of a NRRD file")
    lines, offset = _header_lines(data)
    fields = _header_fields(lines)
    if offset is None or offset >= len(data):
        raise ValueError("the NRRD header has no end (a blank line) in its first 64 KiB, or no voxel data follows it")
    return _declared(lines, offset, fields, max_decoded_bytes)


def _header_lines(data: bytes) -> tuple[list[str], int | None]:
    """The header's lines and where the data start (None: no end found): after the first empty line (LF or CRLF
    line ends, as ITK reads them)."""
    lines, start = [], 0
    while start < min(len(data), _MAX_NRRD_HEADER):
        end = data.find(b"\n", start, _MAX_NRRD_HEADER)
        if end < 0:
            break
        line = data[start:end].decode("latin-1").removesuffix("\r")
        start = end + 1
        if not line:
            return lines, start
        lines.append(line)
    return lines, None


def header_field(line: str) -> tuple[str, str] | None:
    """A NRRD header line's field name (lower case) and value; None for a comment or a `key:=value` pair, which is
    metadata, not a field."""
    if line.startswith("#") or ":" not in line:
        return None
    name, _, value = line.partition(":")
    if value.startswith("="):
        return None
    return name.strip().lower(), value.strip()


def _header_fields(lines: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines[1:]:
        found = header_field(line)
        if found is None:
            continue
        field, value = found
        if field in ("data file", "datafile"):
            raise ValueError("the NRRD header points to a separate data file; send one NRRD file with its voxels attached")
        if field in _NRRD_SINGLE_FIELDS and field in fields:
            raise ValueError(f"the NRRD header has the field '{field}' twice")
        fields[field] = value
    return fields


def _declared(lines: list[str], offset: int, fields: dict[str, str], max_decoded_bytes: int | None) -> NrrdHeader:
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise ValueError(f"the NRRD header has no '{required}' field")
    voxel_bytes = _NRRD_TYPE_BYTES.get(" ".join(fields["type"].lower().split()))
    if voxel_bytes is None:
        raise ValueError(f"the NRRD type '{fields['type']}' is not a voxel type (use short, int, float, ...)")
    dimension = _whole_number(fields["dimension"], "dimension")
    sizes = tuple(_whole_number(value, "sizes") for value in fields["sizes"].split())
    if not 1 <= dimension <= 16 or len(sizes) != dimension or min(sizes) < 1:
        raise ValueError(f"the NRRD header's sizes ({fields['sizes']}) must be {dimension} numbers of at least 1")
    encoding = _NRRD_ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise ValueError(f"the NRRD encoding '{fields['encoding']}' is not accepted: send raw or gzip")
    for skip in ("byte skip", "line skip"):
        if fields.get(skip, "0") != "0":
            raise ValueError(f"the NRRD header's '{skip}' field is not accepted: send the voxels right after the header")
    header = NrrdHeader(tuple(lines), offset, dimension, sizes, voxel_bytes, encoding, _spacing(fields))
    if max_decoded_bytes is not None and header.decoded_bytes > max_decoded_bytes:
        raise TooLargeError(f"the NRRD header declares {' x '.join(map(str, sizes))} voxels of {voxel_bytes} bytes "
                            f"({header.decoded_bytes / 2 ** 20:.0f} MiB decoded); this server's limit is "
                            f"{max_decoded_bytes / 2 ** 20:.0f} MiB (r1seg serve --max-ct-mb): crop or resample the CT")
    return header


def _whole_number(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the NRRD header's {field} must be whole numbers, not {text!r}") from None


def _spacing(fields: dict[str, str]) -> tuple | None:
    """Per-axis spacing from `space directions` (vector lengths) or `spacings`; refuses NaN and infinity."""
    for name in ("space origin", "space directions", "spacings"):
        numbers = fields.get(name, "").replace("(", " ").replace(")", " ").replace(",", " ").split()
        try:
            values = [float(value) for value in numbers if value.lower() != "none"]
        except ValueError:
            raise ValueError(f"the NRRD header's {name} ({fields[name]}) are not numbers") from None
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"the NRRD header's {name} ({fields[name]}) are not all finite numbers; write the CT "
                             "with its real voxel spacing (a reader would take nan for 1 mm)")
    if "space directions" in fields:
        vectors = [v for v in fields["space directions"].split() if v.lower() != "none"]
        lengths = []
        for vector in " ".join(vectors).replace(")", ")\n").splitlines():
            values = [float(value) for value in vector.replace("(", " ").replace(")", " ").replace(",", " ").split()]
            if values:
                lengths.append(math.sqrt(sum(value * value for value in values)))
        return tuple(lengths)
    if "spacings" in fields:
        return tuple(float(value) for value in fields["spacings"].split() if value.lower() != "nan")
    return None


def read_token(path: str) -> str:
    """The token in a file (server and clients); short tokens are refused, readable files warned about."""
    file = Path(path)
    try:
        token = file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InvalidInputError(f"cannot read the token file {file}: {error.strerror}") from None
    if len(token) < 16:
        raise InvalidInputError(f"the token in {file} is {len(token)} characters long; use at least 16 random ones "
                                "(e.g. python3 -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE)")
    if os.name == "posix" and file.stat().st_mode & 0o077:
        print(f"warning: {file} can be read by other users of this machine (chmod 600 {file})", file=sys.stderr)
    return token
