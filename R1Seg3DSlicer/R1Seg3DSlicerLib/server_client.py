"""Questions answered by an R1Seg3D server (`r1seg serve`), for the panel and for batch.py.

`ServerQuestion` is one question as a non-blocking state machine: each `poll()` makes at most a few
short HTTP requests and returns an event of events.py, so the panel's 100 ms timer drives it and
Slicer's main thread never waits on inference. The answer is fetched, whole, only once the server says
it is done; the caller then writes it to the scene (main thread). What can go wrong is told apart,
because each calls for something else:
- a local server that could not start: the cause from its log, and where the log is kept;
- a server that died or stopped answering mid-question: nothing is written, a local one is restarted;
- a CT refused as too large (HTTP 413), or a server of another version: the server is fine and is kept.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from r1seg_core.server import protocol
from r1seg_core.server.client import ServerError, ServerUnreachable, job_error
from r1seg_core.server.nrrd import mask_from_nrrd_bytes, volume_to_nrrd_bytes

from .connection import UploadTooLarge
from .events import CancelledEvent, FailedEvent, FinishedEvent, ProgressEvent
from .i18n import tr as _
from .server_process import ServerProcessError, ServerStartError

# The stage shown while the server loads the model; the chat adds the elapsed seconds, e.g. "... (12 s)". The times are the
# default model's on a 2-core CPU (reviews/2026-12-07/slicer.md: 48 s with an empty cache, 19 s with a warm one).
LOADING_STAGE = _("Loading the model: about 20-50 s the first time, seconds afterwards")
# After Cancel, the server has this long to confirm before a local one is killed (issue #13: about a second).
CANCEL_GRACE_S = 1.0


@dataclass
class RemoteTarget:
    name: str
    mask: np.ndarray
    volume_ml: float
    voxel_count: int
    status: str         # the engine's decision (r1seg_core/inference/decision.py): present, absent or not_trained


@dataclass
class RemoteAnswer:
    """What engine.R1SegSession.write_answer and batch.py read of an AnswerResult, rebuilt from the server's reply."""
    answer: str
    present: bool
    targets: list[RemoteTarget]
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    device: str = ""
    profile: str = ""


def server_options(options) -> dict:
    """The engine.AskOptions a server takes per question (the model, device, precision and profile are the
    server's)."""
    return {"overlap": options.overlap, "loops": options.loops, "sliding_window": options.sliding_window}


def fetch_answer(client, job_id: str) -> RemoteAnswer:
    summary = client.result(job_id)
    targets = [RemoteTarget(target["name"], mask_from_nrrd_bytes(client.mask(job_id, index)), float(target["volume_ml"]),
                            int(target["voxel_count"]), target["status"]) for index, target in enumerate(summary["targets"])]
    return RemoteAnswer(summary["answer"], bool(summary["present"]), targets, list(summary["notes"]),
                        dict(summary["timings_s"]), summary["device"], summary["profile"])


def ask_blocking(client, volume, question: str, options, progress=None) -> RemoteAnswer:
    """For scripts (batch.py): send, wait, fetch. Raises the engine's error types, or ServerError."""
    volume_id = client.upload(volume_to_nrrd_bytes(volume, compress=not client.loopback))
    job = client.submit(volume_id, question, **server_options(options))
    status = client.wait(job["job_id"], progress)
    if status["state"] != protocol.DONE:
        raise job_error(status)
    return fetch_answer(client, job["job_id"])


class ServerQuestion:
    """One question on a server, advanced by `poll()` from the main thread.

    `server` is a server_process.LocalServer (started, maybe not ready yet) or None with a remote
    `client`. `conversation_id()` is called once the server answers, to get the conversation's id there;
    `on_upload(volume_id)`, when given, is told the server's id of the CT once it holds it."""

    def __init__(self, question_id: int, volume, question: str, options, client=None, server=None,
                 conversation_id=None, on_upload=None):
        self.id = question_id
        self._volume, self._question, self._options = volume, question, options
        self._server, self._client = server, client
        self._conversation_id = conversation_id
        self._on_upload = on_upload
        self._job_id = None
        self._cancel_requested_at = None
        self._last_progress = None
        self.finished = False
        self.server_lost = False   # the server died or stopped answering: a local one must be restarted

    def cancel(self) -> None:
        if self._cancel_requested_at is None:
            self._cancel_requested_at = time.monotonic()
        if self._job_id is not None:
            try:
                self._client.cancel(self._job_id)
            except ServerError:
                pass   # the next poll reports what happened to the server

    def poll(self) -> list:
        if self.finished:
            return []
        try:
            return self._advance()
        except ServerUnreachable as error:
            return self._end(FailedEvent(self.id, error, ""), lost=True)
        except ServerError as error:
            return self._end(FailedEvent(self.id, error, ""), lost=isinstance(error, ServerProcessError))
        except Exception as error:  # the engine's refusal (bad CT or question) or a bug: the panel shows it
            return self._end(FailedEvent(self.id, error, traceback.format_exc()))

    def _end(self, event, lost: bool = False) -> list:
        self.finished = True
        self.server_lost = lost
        if lost and isinstance(event, FailedEvent):
            error, message = event.error, self._lost_message(event.error)
            # The same kind of error, now worded for the panel; a local server's error keeps its cause and log.
            said = type(error)(message, error.cause, error.log_path) if isinstance(error, ServerProcessError) \
                else ServerError(message)
            event = FailedEvent(self.id, said, event.traceback_text)
        return [event]

    def _lost_message(self, error) -> str:
        log = getattr(error, "log_path", None)
        kept = _(" The server's log is kept at {path}.").format(path=log) if log else ""
        if isinstance(error, ServerStartError):
            return _("The R1Seg3D server could not start. Its log says:\n{cause}\n{kept}").format(
                cause=error.cause or str(error), kept=kept.strip())
        reason = str(error).splitlines()[0]
        restart = _("the next question starts a new server") if self._server is not None else _("check the server")
        return _("The R1Seg3D server stopped while answering ({reason}). Nothing was added to the scene;"
                 " {restart}.{kept}").format(reason=reason, restart=restart, kept=kept)

    def _advance(self) -> list:
        if self._cancel_requested_at is not None and self._job_id is None:
            return self._end(CancelledEvent(self.id))
        if self._client is None:
            if not self._server.poll_ready():
                return self._progress(0, 0, _("Starting the R1Seg3D server"))
            self._client = self._server.client
        elif self._server is not None:
            self._server.check_alive()
        if self._job_id is None:
            return self._submit()
        status = self._client.status(self._job_id)
        state = status["state"]
        if state == protocol.DONE:
            if self._cancel_requested_at is not None:
                return self._end(CancelledEvent(self.id))
            return self._end(FinishedEvent(self.id, fetch_answer(self._client, self._job_id)))
        if state == protocol.CANCELLED:
            return self._end(CancelledEvent(self.id))
        if state == protocol.FAILED:
            return self._end(FailedEvent(self.id, job_error(status), ""))
        if self._cancel_requested_at is not None and time.monotonic() - self._cancel_requested_at > CANCEL_GRACE_S:
            if self._server is not None:
                self._server.kill()   # it did not stop in time: the next question starts a fresh one
                return self._end(CancelledEvent(self.id), lost=True)
        if state == protocol.QUEUED:
            ahead = status.get("position", 0)
            return self._progress(0, 0, _("Waiting for the server ({ahead} ahead)").format(ahead=ahead))
        if state == protocol.LOADING:
            return self._progress(0, 0, LOADING_STAGE)
        return self._progress(status["done"], status["total"], _("Segmenting") if status["total"] else _("Answering"))

    def _submit(self) -> list:
        # Short, blocking transfers on the main thread: a thread of Slicer's would be starved (see module docstring).
        volume_id = self._upload(volume_to_nrrd_bytes(self._volume, compress=not self._client.loopback))
        if self._on_upload is not None:
            self._on_upload(volume_id)
        conversation_id = self._conversation_id() if callable(self._conversation_id) else self._conversation_id
        job = self._client.submit(volume_id, self._question, conversation_id, **server_options(self._options))
        self._job_id = job["job_id"]
        if self._cancel_requested_at is not None:
            self.cancel()
        self._volume = None   # the server has it
        return self._progress(0, 0, _("Sent to the server"))

    def _upload(self, nrrd: bytes) -> str:
        """The CT's id on the server. A CT the server refuses as too large (r1seg_core's client tells that from a
        dead server, also when the server drops the connection mid-upload) is UploadTooLarge, so no new server is
        started for it."""
        try:
            return self._client.upload(nrrd)
        except ServerError as error:
            if error.status != 413 or isinstance(error, UploadTooLarge):
                raise
            # r1seg_core's client checks the server's limits before it sends, and says so with a 413 of its own.
            raise UploadTooLarge(_("The R1Seg3D server at {url} refuses the CT as too large: {detail}").format(
                url=self._client.url, detail=error), 413, error.kind) from None

    def _progress(self, done, total, stage) -> list:
        if (done, total, stage) == self._last_progress:
            return []
        self._last_progress = (done, total, stage)
        return [ProgressEvent(self.id, done, total, stage)]
