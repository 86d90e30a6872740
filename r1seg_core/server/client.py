"""The HTTP client of `r1seg serve`: standard library only (urllib), so that Slicer's Python and a bare
`r1seg ask --server` need nothing beyond what they already have.

Every call is one short request; waiting for an answer is the caller's loop (`wait` for scripts, a
timer for the Slicer panel), so no thread of the caller ever blocks on inference.
"""
from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .. import __version__
from ..errors import InvalidInputError, R1SegError
from ..files import write_atomically, write_text_atomically
from . import protocol

# Short requests (status, cancel) must never hang a GUI; uploads and masks of a large CT may take a while.
REQUEST_TIMEOUT_S = 10.0
TRANSFER_TIMEOUT_S = 600.0
# One value per client process, sent with every request: the server keeps this process's jobs to itself.
PROCESS_CLIENT_ID = secrets.token_urlsafe(24)


class ServerError(R1SegError):
    """The server refused a request or could not be reached; `kind` is the protocol's error name."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind


class ServerBusy(ServerError):
    """The server answers another question and its queue is full (HTTP 429)."""


class ServerUnreachable(ServerError):
    """No HTTP answer at all: nothing listens there, or the server died."""


def job_error(status: dict) -> R1SegError:
    """The engine error a failed or cancelled job stands for, so callers keep the CLI's exit codes."""
    error = status.get("error") or {}
    kind, detail = error.get("error", protocol.ERROR_ENGINE), error.get("detail", f"the job ended {status.get('state')}")
    if kind in protocol.ENGINE_ERRORS:
        return protocol.ENGINE_ERRORS[kind](detail)
    return ServerError(f"the server could not answer: {detail}", kind=kind)


class Client:
    def __init__(self, url: str, token: str | None = None, client_id: str = PROCESS_CLIENT_ID):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInputError(f"server URL {url!r} is not an http:// or https:// address")
        self.url = url.rstrip("/")
        self.token = token
        self.loopback = protocol.is_loopback(parts.hostname)
        self.client_id = client_id
        self._server_info: dict | None = None
        # A proxy from the environment must never see loopback traffic or the token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({} if self.loopback else None))

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = REQUEST_TIMEOUT_S):
        """(status, bytes) of a reply below 400; raises ServerError (with the server's own sentence) otherwise."""
        headers = {"Accept": "application/json", protocol.API_HEADER: str(protocol.API_VERSION),
                   protocol.CLIENT_HEADER: self.client_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = protocol.JSON_TYPE
        elif body is not None:
            headers["Content-Type"] = protocol.NRRD_TYPE
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                reply = json.loads(raw)
                kind, detail = reply.get("error"), reply.get("detail", "")
            except ValueError:
                kind, detail = None, raw[:200].decode("utf-8", "replace")
            if kind in protocol.ENGINE_ERRORS:   # the engine's refusal (a bad question or CT): its words, its exit code
                raise protocol.ENGINE_ERRORS[kind](detail) from None
            kind_class = ServerBusy if error.code == 429 else ServerError
            raise kind_class(f"the server at {self.url} refused {method} {path} ({error.code}): {detail}",
                             error.code, kind) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServerUnreachable(f"cannot reach the R1Seg3D server at {self.url} ({reason})") from None

    def json(self, method: str, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        return json.loads(self.request(method, path, body, timeout)[1])

    # ---- endpoints -----------------------------------------------------------------------------------------

    def health(self) -> dict:
        return self.json("GET", "/health")

    def server_info(self) -> dict:
        """/health, once per client, refusing a server of another protocol version with both versions named."""
        if self._server_info is None:
            try:
                info = self.health()
            except ValueError:
                info = {}
            api = info.get("api") if isinstance(info, dict) else None
            if api != protocol.API_VERSION:
                server = f"protocol {api}" if api is not None else "no protocol version (not an R1Seg3D server, or one older than protocol 2)"
                raise ServerError(f"the server at {self.url} speaks {server} (r1seg3d {info.get('version', '?')}); this "
                                  f"client speaks protocol {protocol.API_VERSION} (r1seg3d {__version__}): update R1Seg3D "
                                  "on the side with the older protocol", 409, protocol.ERROR_VERSION)
            self._server_info = info
        return self._server_info

    def model_card(self) -> dict:
        return self.json("GET", "/model")

    def upload(self, nrrd: bytes) -> str:
        """The CT's id on the server, sending the bytes only when the server does not hold them yet.

        The server's limits are checked here first: a server refuses an oversized body by closing the connection
        while urllib still sends, which would otherwise look like a server that cannot be reached."""
        limits = self.server_info().get("limits", {})
        self._check_limits(nrrd, limits)
        key = protocol.volume_id(nrrd)
        try:
            self.request("GET", f"/volumes/{key}")
        except ServerError as error:
            if error.status != 404:
                raise
            try:
                self.request("POST", "/volumes", nrrd, timeout=TRANSFER_TIMEOUT_S)
            except ServerUnreachable:
                self.health()   # still unreachable: that is the error; reachable: the server refused the body
                raise ServerError(f"the server at {self.url} closed the connection while receiving the CT "
                                  f"({len(nrrd) / 2 ** 20:.1f} MiB as NRRD); it is running, so it refused the upload, "
                                  "most likely as too large (r1seg serve --max-upload-mb, --max-ct-mb)", 413,
                                  protocol.ERROR_TOO_LARGE) from None
        return key

    def _check_limits(self, nrrd: bytes, limits: dict) -> None:
        upload = limits.get("upload_bytes")
        if upload is not None and len(nrrd) > upload:
            raise ServerError(f"the CT is {len(nrrd) / 2 ** 20:.1f} MiB as NRRD; the server at {self.url} accepts "
                              f"uploads up to {upload / 2 ** 20:.0f} MiB (r1seg serve --max-upload-mb): crop the CT or "
                              "raise the server's limit", 413, protocol.ERROR_TOO_LARGE)
        try:
            protocol.check_nrrd(nrrd, limits.get("ct_bytes"))
        except protocol.TooLargeError as error:
            raise ServerError(f"the server at {self.url} refuses this CT: {error}", 413, protocol.ERROR_TOO_LARGE) from None

    def new_conversation(self) -> str:
        return self.json("POST", "/conversations", {})["conversation_id"]

    def forget_conversation(self, conversation_id: str) -> bool:
        """Drop a conversation's turns on the server; False when it did not know it."""
        return self.json("DELETE", f"/conversations/{urllib.parse.quote(conversation_id, safe='')}")["forgotten"]

    def forget_volume(self, volume_id: str) -> bool:
        """Drop an uploaded CT (and what the server keeps of it); False when it did not hold it."""
        return self.json("DELETE", f"/volumes/{urllib.parse.quote(volume_id, safe='')}")["forgotten"]

    def submit(self, volume_id: str, question: str, conversation_id: str | None = None, **options) -> dict:
        body = {"volume_id": volume_id, "question": question, "conversation_id": conversation_id,
                **{name: value for name, value in options.items() if value is not None}}
        return self.json("POST", "/jobs", body)

    def status(self, job_id: str) -> dict:
        return self.json("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self.json("POST", f"/jobs/{job_id}/cancel", {})

    def result(self, job_id: str) -> dict:
        return self.json("GET", f"/jobs/{job_id}/result", timeout=TRANSFER_TIMEOUT_S)

    def mask(self, job_id: str, index: int) -> bytes:
        return self.request("GET", f"/jobs/{job_id}/masks/{index}", timeout=TRANSFER_TIMEOUT_S)[1]

    def labelmap(self, job_id: str, format: str) -> bytes:
        return self.request("GET", f"/jobs/{job_id}/labelmap?format={urllib.parse.quote(format)}",
                            timeout=TRANSFER_TIMEOUT_S)[1]

    def unload(self) -> dict:
        return self.json("POST", "/unload", {}, timeout=60.0)

    def wait(self, job_id: str, progress=None, interval: float = 0.2) -> dict:
        """Poll until the job ends; returns its final status (for scripts: it blocks the calling thread)."""
        while True:
            status = self.status(job_id)
            if progress is not None and status["total"]:
                progress(status["done"], status["total"], status["stage"])
            if status["state"] in protocol.TERMINAL_STATES:
                return status
            time.sleep(interval)


def client_from_arguments(url: str, token_file: str | None) -> Client:
    return Client(url, protocol.read_token(token_file) if token_file else None)


def labelmap_format(path: Path) -> str:
    name = path.name.lower()
    for format, suffix in protocol.LABELMAP_FORMATS.items():
        if name.endswith(suffix):
            return format
    raise InvalidInputError(f"{path}: the output must end in one of {', '.join(protocol.LABELMAP_FORMATS.values())}")


def ask_command(args, progress=None) -> int:
    """`r1seg ask --server URL`: the CT is read and checked here, the model runs on the server (output folders are
    checked by the caller, cli.command_ask)."""
    from ..answer_output import print_answer, print_outputs
    from ..volume import read_volume
    from .nrrd import volume_to_nrrd_bytes

    output_format = labelmap_format(Path(args.output)) if args.output else None
    client = client_from_arguments(args.server, args.token_file)
    volume = read_volume(args.ct)
    volume_id = client.upload(volume_to_nrrd_bytes(volume, compress=not client.loopback))
    job = client.submit(volume_id, args.question, overlap=args.overlap, loops=args.loops, window_batch=args.window_batch,
                        answer_mode=args.answer_mode, global_step=args.global_step,
                        sliding_window=not args.no_sliding_window, seed=args.seed)
    if job["state"] == protocol.QUEUED:
        print(f"note: the server is busy; this question waits behind {job['position']}", file=sys.stderr)
    try:
        status = client.wait(job["job_id"], progress)
    except KeyboardInterrupt:
        client.cancel(job["job_id"])
        raise
    if status["state"] != protocol.DONE:
        raise job_error(status)
    result = client.result(job["job_id"])
    print_answer(result)
    if args.output:
        labelmap = client.labelmap(job["job_id"], output_format)
        write_atomically(args.output, lambda stream: stream.write(labelmap))
    if args.json:
        answer = {key: value for key, value in result.items() if key not in ("job_id", "volume_id")}
        write_text_atomically(args.json, json.dumps(answer, indent=2))
    print_outputs(args, result)
    return 0
