"""The server's model host and its job queue: one question at a time per model.

The model runs on one worker thread of the server process (the process has no GUI thread that could
hold the interpreter lock). Questions wait in a short queue; beyond it they are refused as "busy".

Cancel is cooperative but fine-grained: besides the predictor's own check between window batches,
a forward pre-hook on every module of the loaded model raises when the running job's cancel event is
set, so the whole-CT LLM step and the encoder stop within one layer. Loading cannot be interrupted
from Python; a job cancelled while the model loads ends at once, and the load goes on so that the
next question finds the model ready (a client that must have the memory back stops the process).
"""
from __future__ import annotations

import gc
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CancelledError, R1SegError
from ..volume import Volume
from . import protocol
from .memory import return_free_heap_memory

log = logging.getLogger("r1seg.serve")

# How often a job waiting for the model looks at its cancel event.
_CANCEL_POLL_S = 0.05


class BusyError(Exception):
    """The queue is full; the message says how many questions run and wait."""


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    profile: str = "auto"
    threads: int | None = None     # torch threads; None leaves torch's default
    max_waiting: int = 2           # questions that may wait behind the running one
    max_volumes: int = 4           # uploaded CTs kept (least recently used go first)
    keep_finished: int = 8         # finished jobs whose results can still be fetched
    keep_results_s: float = protocol.DEFAULT_KEEP_RESULTS_S   # a finished job's masks go after this, or once fetched


def error_reply(error: BaseException) -> tuple[str, str]:
    """(protocol error kind, message) of an exception raised while answering."""
    for name, kind in protocol.ENGINE_ERRORS.items():
        if isinstance(error, kind):
            return name, str(error)
    if isinstance(error, R1SegError):
        return protocol.ERROR_ENGINE, str(error)
    return protocol.ERROR_INTERNAL, f"unexpected server error ({type(error).__name__}: {error}); the server log has the details"


class ModelHost:
    """The predictor, loaded on a thread of its own so that waiting for it can be cancelled."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._predictor = None
        self._loader: threading.Thread | None = None
        self._load_error: BaseException | None = None
        self._generation = 0           # bumped by unload, so a load that finishes afterwards is dropped
        self._active_cancel: threading.Event | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._predictor is not None:
                return "ready"
            if self._loader is not None:
                return "loading"
            return "failed" if self._load_error is not None else "unloaded"

    def start_loading(self) -> None:
        with self._lock:
            if self._predictor is None and self._loader is None:
                self._load_error = None
                self._loader = threading.Thread(target=self._load, args=(self._generation,), name="r1seg model loader",
                                                daemon=True)
                self._loader.start()

    def _load(self, generation: int) -> None:
        from ..inference import Predictor

        try:
            if self.settings.threads:
                import torch
                torch.set_num_threads(self.settings.threads)
            started = time.monotonic()
            predictor = Predictor(self.settings.model_dir, device=self.settings.device, dtype=self.settings.dtype,
                                  profile=self.settings.profile)
            for module in predictor.model.modules():
                module.register_forward_pre_hook(self._stop_if_cancelled)
            log.info("model loaded in %.1f s on %s", time.monotonic() - started, predictor.device)
        except BaseException as error:  # reported to the question that waits for the model
            log.exception("loading the model failed")
            with self._lock:
                self._loader = None
                self._load_error = error
            return
        with self._lock:
            self._loader = None
            if generation == self._generation:
                self._predictor = predictor

    def _stop_if_cancelled(self, module, inputs) -> None:
        cancel = self._active_cancel
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled by the user")

    def predictor(self, cancel: threading.Event):
        """The loaded predictor, loading it first if needed; raises CancelledError when `cancel` is set first."""
        self.start_loading()
        while True:
            with self._lock:
                if self._predictor is not None:
                    return self._predictor
                if self._load_error is not None:
                    error, self._load_error = self._load_error, None   # the next question tries again
                    raise error
            if cancel.wait(_CANCEL_POLL_S):
                raise CancelledError("cancelled while the model was loading (the load goes on for the next question)")

    def run(self, job: "Job"):
        predictor = self.predictor(job.cancel)
        job.set_stage(protocol.RUNNING, "answering")
        self._active_cancel = job.cancel
        try:
            return predictor.ask(job.volume, job.question, conversation=job.conversation, progress=job.progress,
                                 cancel=job.cancel, **job.options)
        finally:
            self._active_cancel = None

    def model_info(self) -> dict:
        with self._lock:
            predictor = self._predictor
        if predictor is None:
            return {}
        return {"device": str(predictor.device), "dtype": str(predictor.dtype).removeprefix("torch."),
                "profile": predictor.profile.name, "placeholder": predictor.is_placeholder}

    def clear_ct_cache(self) -> None:
        """Drop the model's cached CT (resampled voxels, encoder outputs); only call it while no job runs."""
        with self._lock:
            predictor = self._predictor
        if predictor is not None:
            predictor.clear_cache()

    def unload(self) -> None:
        """Drop the model and its CT cache; only call it while no job runs (the queue's worker does)."""
        with self._lock:
            self._generation += 1
            self._predictor = None
            self._load_error = None
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class Job:
    id: str
    question: str
    volume: Any
    conversation: Any
    options: dict
    volume_id: str
    owner: str = ""                # the creating client's X-R1Seg3D-Client value
    state: str = protocol.QUEUED
    done: int = 0
    total: int = 0
    stage: str = "waiting for the model"
    error: dict | None = None
    result: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None
    summary: dict | None = None    # result.to_dict(): kept after the masks are dropped
    finished_at: float | None = None
    fetched_masks: set = field(default_factory=set)

    def set_stage(self, state: str, stage: str, done: int = 0, total: int = 0) -> None:
        self.state, self.stage, self.done, self.total = state, stage, done, total

    def progress(self, done: int, total: int, stage: str) -> None:
        self.set_stage(protocol.RUNNING, stage, int(done), int(total))

    def status(self, position: int | None) -> dict:
        reply = {"job_id": self.id, "state": self.state, "done": self.done, "total": self.total, "stage": self.stage,
                 "error": self.error, "seconds": self.seconds}
        if position is not None:
            reply["position"] = position
        return reply

    def release_masks(self) -> None:
        """Drop the masks (the answer's text and numbers stay); the CT was dropped when the job finished."""
        self.result = None

    def mask_fetched(self, index: int | None) -> None:
        """A client fetched one mask (or, with None, the labelmap of all): once it has them all, they go."""
        if index is not None:
            self.fetched_masks.add(index)
        if index is None or (self.summary and len(self.fetched_masks) >= len(self.summary["targets"])):
            self.release_masks()


def geometry_only(volume: Volume) -> Volume:
    """The CT's grid without its voxels (a zero-stride view of one value): enough to write masks on its grid."""
    placeholder = np.broadcast_to(np.zeros((), dtype=volume.array.dtype), volume.shape)
    return volume.with_array(placeholder)


_UNLOAD = object()


class JobQueue:
    """Runs jobs one at a time on a worker thread; keeps the last finished ones for their results."""

    def __init__(self, host: ModelHost, settings: ServeSettings):
        self.host = host
        self.settings = settings
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque = deque()
        self._running: Job | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._stopping = False
        self._unloaded = threading.Event()
        self._thread = threading.Thread(target=self._work, name="r1seg worker", daemon=True)
        self._thread.start()

    # ---- called from request handlers ------------------------------------------------------------------

    def submit(self, **fields) -> tuple[Job, int]:
        """Queue a question; returns the job and its place (0: runs now). Raises BusyError when the queue is full."""
        with self._lock:
            self._expire_masks()
            waiting = self._waiting_jobs()
            # Counted as one running plus the waiting ones, whether or not the worker has taken the first one yet:
            # just after a submit the running question still sits in the queue.
            if (self._running is not None) + len(waiting) > self.settings.max_waiting:
                raise BusyError(f"busy: the server is answering a question and {len(waiting) - (self._running is None)} "
                                f"more wait (at most {self.settings.max_waiting}); try again when one has finished")
            # Random: an id cannot be guessed, and an id from an earlier server run names nothing here.
            job = Job(id=f"j{secrets.token_hex(16)}", **fields)
            self._jobs[job.id] = job
            self._waiting.append(job)
            position = len(self._waiting_jobs()) - (0 if self._running else 1)
            self._wake.notify()
            return job, position

    def get(self, job_id: str, owner: str = "") -> tuple[Job | None, int | None]:
        """The job and its place in the queue; (None, None) for an unknown id or another client's job."""
        with self._lock:
            self._expire_masks()
            job = self._jobs.get(job_id)
            if job is None or not hmac.compare_digest(job.owner.encode(), owner.encode()):
                return None, None
            position = None
            if job in self._waiting:
                position = self._waiting_jobs().index(job) + (1 if self._running else 0)
            return job, position

    def _waiting_jobs(self) -> list:
        return [job for job in self._waiting if job is not _UNLOAD]

    def _expire_masks(self) -> None:
        """Under the lock: finished jobs older than keep_results_s let go of their masks."""
        cutoff = time.monotonic() - self.settings.keep_results_s
        for job in self._jobs.values():
            if job.finished_at is not None and job.finished_at < cutoff:
                job.release_masks()

    def cancel(self, job_id: str, owner: str = "") -> Job | None:
        job, _ = self.get(job_id, owner)
        if job is None:
            return None
        with self._lock:
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, cancelled=True)
            return job

    @property
    def counts(self) -> tuple[bool, int]:
        with self._lock:
            return self._running is not None, len(self._waiting_jobs())

    def forget_volume(self, volume_id: str) -> None:
        """A client is done with a CT: finished jobs on it let go of it and their answers, and the model's cached CT
        goes too unless a question runs or waits (the worker takes jobs under this lock, so none starts meanwhile)."""
        with self._lock:
            for job in self._jobs.values():
                if job.volume_id == volume_id and job.state in protocol.TERMINAL_STATES:
                    job.volume = job.result = job.summary = None
            if self._running is None and not self._waiting:
                self.host.clear_ct_cache()

    def unload(self, timeout: float) -> bool:
        """Cancel every job, then free the model on the worker (where nothing else holds it); True when done."""
        with self._lock:
            for job in self._waiting_jobs():   # not an earlier unload's marker, still queued if it timed out
                job.cancel.set()
                self._finish(job, cancelled=True)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel.set()
            for job in self._jobs.values():
                job.volume = job.conversation = job.result = job.summary = None   # their memory goes too
            self._unloaded.clear()
            self._waiting.append(_UNLOAD)
            self._wake.notify()
        return self._unloaded.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in [self._running, *self._waiting]:
                if isinstance(job, Job):
                    job.cancel.set()
            self._wake.notify()
        self._thread.join(5.0)

    # ---- the worker thread -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                if job is _UNLOAD:
                    self._running = None
                else:
                    self._running = job
            if job is _UNLOAD:
                self.host.unload()
                self._unloaded.set()
                continue
            started = time.monotonic()
            result, failure = None, None
            try:
                if self.host.state == "ready":
                    job.set_stage(protocol.RUNNING, "answering")
                else:
                    job.set_stage(protocol.LOADING, "loading the model")
                result = self.host.run(job)
            except BaseException as error:  # a failed question is data for its client, never the server's end
                failure = error_reply(error)
                if failure[0] == protocol.ERROR_INTERNAL:
                    log.exception("job %s failed", job.id)
            with self._lock:
                job.seconds = time.monotonic() - started
                if job.cancel.is_set() or (failure is not None and failure[0] == protocol.ERROR_CANCELLED):
                    # Cancel promises that nothing reaches the client, even if the answer came in just after it.
                    self._finish(job, cancelled=True)
                elif failure is not None:
                    job.error = {"error": failure[0], "detail": failure[1]}
                    job.state = protocol.FAILED
                    self._finish(job)
                else:
                    job.result, job.summary = result, result.to_dict()
                    job.state = protocol.DONE
                    job.stage = "done"
                    self._finish(job)
                # The job owns the answer; kept here, its masks would outlive their fetch until the next question.
                result = None
                self._running = None
            return_free_heap_memory()     # what the question freed goes back now, not never (memory.py)

    def _finish(self, job: Job, cancelled: bool = False) -> None:
        """Under the lock: end a job and forget the oldest finished ones beyond `keep_finished`."""
        if cancelled:
            job.state = protocol.CANCELLED
            job.stage = "cancelled"
            job.error = {"error": protocol.ERROR_CANCELLED, "detail": "cancelled by the user"}
        job.conversation = None
        job.finished_at = time.monotonic()
        if job.volume is not None:
            # The stored CT may be evicted or forgotten: a finished job must not keep its voxels alive.
            job.volume = geometry_only(job.volume)
        finished = [j for j in self._jobs.values() if j.state in protocol.TERMINAL_STATES]
        for old in finished[:max(0, len(finished) - self.settings.keep_finished)]:
            del self._jobs[old.id]
