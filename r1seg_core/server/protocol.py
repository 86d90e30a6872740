"""The wire format of `r1seg serve`, shared by the server and its clients. Standard library only.

A CT travels as the bytes of one attached NRRD file (raw or gzip encoding: voxels plus geometry in a
documented, non-executable format); masks come back the same way; everything else is JSON. Nothing
is ever unpickled: a body that is not NRRD is refused before any reader sees it.

    GET  /health                       {"status", "model": loading|ready|unloaded|failed, "busy", "queued", ...}
    GET  /model                        the model card: {"model_dir", "card", "text", "placeholder", "device", ...}
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
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import sys
from pathlib import Path

from ..errors import CancelledError, CheckpointError, InvalidInputError, OutOfMemoryError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8740
DEFAULT_MAX_UPLOAD_MB = 1024
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


def check_nrrd(data: bytes) -> None:
    """Refuse anything but one self-contained NRRD file, naming what is wrong (ValueError).

    A header with a `data file` field would make the reader open any path on the server, so only
    attached data is accepted. A pickle is named as such, because that is the likely mistake."""
    if not data:
        raise ValueError("the body is empty: send the CT as the bytes of a NRRD file")
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ValueError("the body looks like a Python pickle; this server never unpickles anything: send the CT "
                         "as the bytes of a NRRD file")
    if not data.startswith(_NRRD_MAGIC):
        raise ValueError(f"the body is not a NRRD file (it starts with {data[:8]!r}, not 'NRRD000'): send the CT as "
                         "the bytes of a NRRD file")
    end = data.find(b"\n\n", 0, _MAX_NRRD_HEADER)
    if end < 0:
        raise ValueError("the NRRD header has no end (a blank line) in its first 64 KiB, or no voxel data follows it")
    for line in data[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        field = line.split(":", 1)[0].strip().lower()
        if field in ("data file", "datafile"):
            raise ValueError("the NRRD header points to a separate data file; send one NRRD file with its voxels attached")


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
