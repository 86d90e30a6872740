"""The FastAPI application of `r1seg serve`, and the command that runs it under uvicorn.

Security, in the order a request meets it (see README "Server"):
- bound to 127.0.0.1 unless told otherwise, and bound elsewhere only with a token;
- with a token, every request carries `Authorization: Bearer <token>` (compared in constant time);
- on a loopback bind, a Host header that is not a loopback name is refused (DNS rebinding), and any
  request with an Origin header is refused (a web page's; our clients never send one);
- bodies are size-limited while they are read (413), JSON posts must say they are JSON and uploads
  must be NRRD, so a browser cannot send either without a refused pre-flight;
- nothing is unpickled, a NRRD with a detached data file is refused, and every error is a JSON 4xx
  that names the problem (a bug is a JSON 500 without a traceback; the log has it);
- what a request may cost is bounded: a CT's decoded size and extent are checked from its header before
  anything is decoded, at most UPLOAD_SLOTS uploads are received and decoded at once, a question's options
  are range-checked (protocol.JOB_LIMITS), and finished jobs keep neither their CT nor, once fetched or
  expired, their masks;
- job ids are random and belong to the client that created them (protocol.CLIENT_HEADER).
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import InvalidInputError
from . import protocol
from .jobs import BusyError, JobQueue, ModelHost, ServeSettings
from .memory import mapped_copy

log = logging.getLogger("r1seg.serve")

# Conversations are a few lines of text each; the bound only stops a client from growing the server forever.
MAX_CONVERSATIONS = 256
_EVENT_INTERVAL_S = 0.1
# Uploads received and decoded at once: each holds its body and up to twice its decoded CT while it decodes.
# Others wait for a slot (their bodies stay unread, in the kernel's buffers) up to UPLOAD_WAIT_S, then get 429.
UPLOAD_SLOTS = 2
UPLOAD_WAIT_S = 60.0


class JobRequest(BaseModel):
    """The JSON of POST /jobs, strictly typed (no "3" for 3); `check_job_limits` and the engine check the ranges."""
    model_config = ConfigDict(extra="forbid", strict=True)

    volume_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    question: str = Field(max_length=4000)
    conversation_id: Optional[str] = Field(default=None, max_length=64)
    overlap: Optional[float] = None
    loops: Optional[int] = None
    window_batch: Optional[int] = None
    answer_mode: Optional[Literal["constrained", "generate", "sample"]] = None
    global_step: Optional[Literal["off", "answer", "skip"]] = None
    sliding_window: Optional[bool] = None
    seed: Optional[int] = None


class RequestError(Exception):
    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def _problems(errors: list[dict]) -> str:
    """Pydantic's validation errors as one sentence: where each is, and what is wrong there."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)


def check_job_limits(options: dict) -> None:
    """The server's ranges for a question's options (protocol.JOB_LIMITS), as a 400 that names the range."""
    for name, (low, high) in protocol.JOB_LIMITS.items():
        value = options.get(name)
        if value is not None and not low <= value <= high:
            raise RequestError(400, protocol.ERROR_INVALID_INPUT, f"{name} must be between {low} and {high} on this "
                               f"server; got {value}")


def _error(status: int, kind: str, detail: str, **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": kind, "detail": detail, **extra}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytearray:
    """The body, counted while it arrives: a missing or lying Content-Length cannot get past the limit."""
    body = bytearray()    # grown in place: a list of chunks and their join would hold the body twice
    async for chunk in request.stream():   # a client that hangs up raises ClientDisconnect: one log line
        if len(body) + len(chunk) > limit:
            raise RequestError(413, protocol.ERROR_TOO_LARGE, f"the body is larger than the server's limit of {limit} bytes")
        body += chunk
    return body


def _require_type(request: Request, expected: str) -> None:
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != expected:
        raise RequestError(415, protocol.ERROR_BAD_REQUEST, f"Content-Type must be {expected}, not {given or 'missing'}")


async def _read_json(request: Request) -> dict:
    _require_type(request, protocol.JSON_TYPE)
    body = await _read_body(request, protocol.MAX_JSON_BYTES)
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, protocol.ERROR_BAD_REQUEST, f"the body is not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError(400, protocol.ERROR_BAD_REQUEST, "the body's JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError(400, protocol.ERROR_BAD_REQUEST, "the body must be a JSON object")
    return value


def _loopback_host_header(value: str) -> bool:
    host = value.rsplit("]", 1)[0].lstrip("[") if value.startswith("[") else value.split(":")[0]
    return protocol.is_loopback(host)


def _owner(request: Request) -> str:
    return request.headers.get(protocol.CLIENT_HEADER, "")


def version_mismatch(client_api: str) -> JSONResponse:
    message = (f"client protocol {client_api}, server protocol {protocol.API_VERSION} (r1seg3d {__version__}): update "
               "R1Seg3D on the side with the older protocol, so that the client and the server speak the same one")
    # The server's own version and protocol too, so that a client can name both (the Slicer panel does).
    return _error(409, protocol.ERROR_VERSION, message, message=message, version=__version__, api=protocol.API_VERSION)


def create_app(settings: ServeSettings, token: str | None = None, max_upload_bytes: int = protocol.DEFAULT_MAX_UPLOAD_MB << 20,
               loopback_only: bool = True, on_ready=None, max_ct_bytes: int = protocol.DEFAULT_MAX_CT_MB << 20) -> FastAPI:
    """The application; `on_ready(app)` runs once it serves (r1seg serve writes its --ready-file there)."""
    host = ModelHost(settings)
    queue = JobQueue(host, settings)
    volumes: OrderedDict[str, object] = OrderedDict()
    conversations: OrderedDict[str, object] = OrderedDict()
    store_lock = threading.Lock()
    upload_slots = asyncio.Semaphore(UPLOAD_SLOTS)

    async def lifespan(app):
        host.start_loading()
        if on_ready is not None:
            on_ready(app)
        yield
        queue.stop()

    app = FastAPI(title="R1Seg3D server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    app.state.host = host

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _error(401, protocol.ERROR_UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer <token>'")
        if loopback_only and not _loopback_host_header(request.headers.get("host", "")):
            return _error(403, protocol.ERROR_FORBIDDEN, "this server listens on the loopback interface only; the Host header "
                          "must be 127.0.0.1, ::1 or localhost")
        if "origin" in request.headers:
            return _error(403, protocol.ERROR_FORBIDDEN, "requests from web pages (with an Origin header) are refused")
        client_api = request.headers.get(protocol.API_HEADER)
        if client_api is not None and client_api.strip() != str(protocol.API_VERSION):
            return version_mismatch(client_api.strip()[:20])
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(400, protocol.ERROR_BAD_REQUEST, "Content-Length is not a number")
            upload = request.url.path == "/volumes"
            limit = max_upload_bytes if upload else protocol.MAX_JSON_BYTES
            if int(declared) > limit:
                return _error(413, protocol.ERROR_TOO_LARGE, f"the body has {declared} bytes; this server's limit for "
                              f"{request.url.path} is {limit} bytes" + (" (r1seg serve --max-upload-mb)" if upload else ""))
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return _error(error.status, error.kind, error.detail)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request, error):
        log.info("the client hung up during %s %s", request.method, request.url.path)
        return _error(400, protocol.ERROR_BAD_REQUEST, "the client hung up before its request was complete")

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request, error: RequestValidationError):
        return _error(422, protocol.ERROR_BAD_REQUEST, f"invalid request: {_problems(error.errors())}")

    @app.exception_handler(404)
    async def not_found(request, error):
        return _error(404, protocol.ERROR_NOT_FOUND, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def wrong_method(request, error):
        return _error(405, protocol.ERROR_BAD_REQUEST, f"{request.method} is not allowed on {request.url.path}")

    @app.exception_handler(Exception)
    async def internal(request, error):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, protocol.ERROR_INTERNAL, f"unexpected server error ({type(error).__name__}); the server log has the details")

    def job_or_404(request: Request, job_id: str):
        return found_or_404(job_id, *queue.get(job_id, _owner(request)))

    def found_or_404(job_id: str, job, position=None):
        if job is None:
            raise RequestError(404, protocol.ERROR_NOT_FOUND, f"no job {job_id[:80]!r} of this client (finished jobs "
                               f"are kept only for the last {settings.keep_finished} questions)")
        return job, position

    def done_job(request: Request, job_id: str):
        job, _ = job_or_404(request, job_id)
        if job.state == protocol.DONE and job.summary is None:
            raise RequestError(410, protocol.ERROR_NOT_FOUND, f"job {job_id}'s answer was released (its CT was "
                               "forgotten or the model unloaded)")
        if job.state != protocol.DONE:
            raise RequestError(409, protocol.ERROR_NOT_READY, f"job {job_id} is {job.state}, not done"
                               + (f": {job.error['detail']}" if job.error else ""))
        return job

    def job_with_masks(request: Request, job_id: str):
        job = done_job(request, job_id)
        result = job.result
        if result is None:
            raise RequestError(410, protocol.ERROR_NOT_FOUND, f"job {job_id}'s masks were released: each is sent once "
                               f"(the labelmap once for all), and kept at most {settings.keep_results_s:.0f} s")
        return job, result

    @app.get("/health")
    async def health():
        busy, waiting = queue.counts
        return {"status": "ok", "model": host.state, "busy": busy, "queued": waiting, "max_waiting": settings.max_waiting,
                "pid": os.getpid(), "version": __version__, "api": protocol.API_VERSION,
                "limits": {"upload_bytes": max_upload_bytes, "ct_bytes": max_ct_bytes, "json_bytes": protocol.MAX_JSON_BYTES,
                           "job": protocol.JOB_LIMITS, "keep_results_s": settings.keep_results_s}}

    @app.get("/model")
    def model_card():
        from .. import default_model_path
        from ..config import R1Seg3DConfig
        from ..model_card import read_card

        folder = Path(settings.model_dir) if settings.model_dir else default_model_path()
        config = R1Seg3DConfig.load(folder)
        # The folder's name only: a client has no use for the server's file system, and should not learn it.
        return {"model": folder.name, "card": config.card, "text": read_card(folder, config.card), "state": host.state,
                "placeholder": bool(config.card.get("untrained")), **host.model_info()}

    @app.post("/volumes", status_code=201)
    async def upload(request: Request):
        _require_type(request, protocol.NRRD_TYPE)
        try:
            await asyncio.wait_for(upload_slots.acquire(), UPLOAD_WAIT_S)
        except asyncio.TimeoutError:
            raise RequestError(429, protocol.ERROR_BUSY, f"busy: {UPLOAD_SLOTS} uploads are being received and decoded; "
                               "try again in a moment") from None
        try:
            data = await _read_body(request, max_upload_bytes)
            # Hashing a large upload off the event loop too, so /health and the event streams keep answering.
            key = await run_in_threadpool(protocol.volume_id, data)
            volume = await run_in_threadpool(_read_ct, data, max_ct_bytes)
        except protocol.TooLargeError as error:
            raise RequestError(413, protocol.ERROR_TOO_LARGE, str(error)) from None
        except (ValueError, InvalidInputError) as error:
            raise RequestError(400, protocol.ERROR_INVALID_INPUT, str(error)) from None
        except MemoryError:
            # The traceback's frames hold the half-decoded image: collect them now, not at some later collection.
            gc.collect()
            raise RequestError(507, protocol.ERROR_OUT_OF_MEMORY, "the server has not enough memory to decode this CT "
                               "now; try again later or send a smaller CT") from None
        finally:
            upload_slots.release()
        with store_lock:
            volumes[key] = volume
            volumes.move_to_end(key)
            while len(volumes) > settings.max_volumes:
                volumes.popitem(last=False)
        return {"volume_id": key, "shape": list(volume.shape)}

    def stored_volume(volume_id: str):
        """The stored CT, now the most recently used (a CT in use is not evicted by others' uploads), or None."""
        with store_lock:
            volume = volumes.get(volume_id)
            if volume is not None:
                volumes.move_to_end(volume_id)
        return volume

    @app.get("/volumes/{volume_id}")
    async def has_volume(volume_id: str):
        volume = stored_volume(volume_id)
        if volume is None:
            raise RequestError(404, protocol.ERROR_NOT_FOUND, f"the server does not hold CT {volume_id}: upload it")
        return {"volume_id": volume_id, "shape": list(volume.shape)}

    @app.delete("/volumes/{volume_id}")
    async def forget_volume(volume_id: str):
        with store_lock:
            known = volumes.pop(volume_id, None) is not None
        queue.forget_volume(volume_id)
        return {"volume_id": volume_id, "forgotten": known}

    @app.post("/conversations", status_code=201)
    async def new_conversation(request: Request):
        from ..inference.conversation import Conversation

        await _read_json(request)
        key = uuid.uuid4().hex
        with store_lock:
            conversations[key] = Conversation()
            while len(conversations) > MAX_CONVERSATIONS:
                conversations.popitem(last=False)
        return {"conversation_id": key}

    @app.delete("/conversations/{conversation_id}")
    async def forget_conversation(conversation_id: str):
        with store_lock:
            known = conversations.pop(conversation_id, None) is not None
        return {"conversation_id": conversation_id, "forgotten": known}

    @app.post("/jobs", status_code=202)
    async def submit(request: Request):
        from ..inference.predictor import AskOptions
        from ..prompting import validate_question

        try:
            body = JobRequest.model_validate(await _read_json(request))
        except ValidationError as error:
            raise RequestError(422, protocol.ERROR_BAD_REQUEST,
                               f"the question's JSON is not valid: {_problems(error.errors())}") from None
        options = body.model_dump(exclude={"volume_id", "question", "conversation_id"}, exclude_none=True)
        check_job_limits(options)
        try:
            question = validate_question(body.question)
            AskOptions(**options).validate()
        except InvalidInputError as error:
            raise RequestError(400, protocol.ERROR_INVALID_INPUT, str(error)) from None
        volume = stored_volume(body.volume_id)
        with store_lock:
            conversation = conversations.get(body.conversation_id) if body.conversation_id else None
        if volume is None:
            raise RequestError(404, protocol.ERROR_NOT_FOUND, f"the server does not hold CT {body.volume_id}: upload it first")
        if body.conversation_id and conversation is None:
            raise RequestError(404, protocol.ERROR_NOT_FOUND, f"no conversation {body.conversation_id!r}: start one with POST /conversations")
        try:
            job, position = queue.submit(question=question, volume=volume, conversation=conversation, options=options,
                                         volume_id=body.volume_id, owner=_owner(request))
        except BusyError as error:
            _, waiting = queue.counts
            return _error(429, protocol.ERROR_BUSY, str(error), queued=waiting, max_waiting=settings.max_waiting)
        return {"job_id": job.id, "state": protocol.RUNNING if position == 0 else protocol.QUEUED, "position": position}

    @app.get("/jobs/{job_id}")
    async def job_status(request: Request, job_id: str):
        job, position = job_or_404(request, job_id)
        return job.status(position)

    @app.get("/jobs/{job_id}/events")
    async def job_events(request: Request, job_id: str):
        job_or_404(request, job_id)
        owner = _owner(request)

        async def stream():
            last = None
            while True:
                job, position = queue.get(job_id, owner)
                if job is None:
                    return
                status = json.dumps(job.status(position))
                if status != last:
                    last = status
                    yield f"data: {status}\n\n"
                if job.state in protocol.TERMINAL_STATES:
                    return
                await asyncio.sleep(_EVENT_INTERVAL_S)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str):
        await _read_json(request)
        job, _ = found_or_404(job_id, queue.cancel(job_id, _owner(request)))
        return {"job_id": job_id, "state": job.state}

    @app.get("/jobs/{job_id}/result")
    async def result(request: Request, job_id: str):
        job = done_job(request, job_id)
        return {"job_id": job_id, "volume_id": job.volume_id, **job.summary}

    @app.get("/jobs/{job_id}/masks/{index}")
    async def mask(request: Request, job_id: str, index: int):
        job, answer = job_with_masks(request, job_id)
        if not 0 <= index < len(answer.targets):
            raise RequestError(404, protocol.ERROR_NOT_FOUND, f"job {job_id} has {len(answer.targets)} targets; no target {index}")
        target = answer.targets[index]
        data = await run_in_threadpool(_labelmap_bytes, target.mask, job.volume, {1: target.name}, None, ".nrrd")
        job.mask_fetched(index)
        return Response(data, media_type=protocol.NRRD_TYPE)

    @app.get("/jobs/{job_id}/labelmap")
    async def labelmap(request: Request, job_id: str, format: str = "seg.nrrd"):
        from ..answer_output import segment_colors

        if format not in protocol.LABELMAP_FORMATS:
            raise RequestError(400, protocol.ERROR_BAD_REQUEST, f"format must be one of {sorted(protocol.LABELMAP_FORMATS)}")
        job, answer = job_with_masks(request, job_id)
        labels, names = answer.labelmap()
        data = await run_in_threadpool(_labelmap_bytes, labels, job.volume, names, segment_colors(answer),
                                       protocol.LABELMAP_FORMATS[format])
        job.mask_fetched(None)
        return Response(data, media_type=protocol.NRRD_TYPE)

    @app.post("/unload")
    async def unload(request: Request):
        await _read_json(request)
        with store_lock:
            volumes.clear()
        finished = await run_in_threadpool(queue.unload, 10.0)
        return {"unloaded": finished, "model": host.state}

    return app


def _read_ct(data: bytes, max_ct_bytes: int):
    from .nrrd import volume_from_nrrd_bytes

    volume = volume_from_nrrd_bytes(data, name="uploaded CT", max_decoded_bytes=max_ct_bytes)
    # Stored across questions: in the heap it would keep the questions' freed buffers resident (memory.py).
    return volume.with_array(mapped_copy(volume.array))


def _labelmap_bytes(labels, reference, names, colors, suffix: str) -> bytes:
    from ..volume import write_labelmap

    with tempfile.TemporaryDirectory(prefix="r1seg-") as folder:
        path = write_labelmap(Path(folder) / f"labels{suffix}", labels, reference, names, colors)
        return path.read_bytes()
