"""Run questions off Slicer's main thread and hand progress and results back through a queue.

One long-lived daemon thread runs every job in turn. Keeping all model work on one thread keeps
the model, and the CUDA/cuDNN state that is cached per thread, warm between questions. Jobs must
not touch Qt or MRML: the main thread reads the volume before submitting and writes the answer
after `poll()` returns it.

A job is `job(progress, cancel_event) -> result`. `progress(done, total, stage)` posts an event and
raises `JobCancelled` once cancel was requested, so a job that reports progress per window stops
at the next window even if it never looks at `cancel_event` itself.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class JobCancelled(Exception):
    """Raised inside a job by its progress callback after cancel was requested."""


@dataclass(frozen=True)
class ProgressEvent:
    job_id: int
    done: int
    total: int
    stage: str


@dataclass(frozen=True)
class FinishedEvent:
    job_id: int
    result: Any


@dataclass(frozen=True)
class FailedEvent:
    job_id: int
    error: BaseException
    traceback_text: str


@dataclass(frozen=True)
class CancelledEvent:
    job_id: int


TERMINAL_EVENTS = (FinishedEvent, FailedEvent, CancelledEvent)

_STOP = object()


class BackgroundRunner:
    def __init__(self, thread_name: str = "R1Seg3D worker"):
        self._jobs: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._next_job_id = 1
        self._current_job_id: int | None = None
        self._current_cancel: threading.Event | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current_job_id is not None

    def submit(self, job: Callable[[Callable[[int, int, str], None], threading.Event], Any]) -> int:
        """Queue a job and return its id; refuses a second job while one is in flight."""
        with self._lock:
            if self._current_job_id is not None:
                raise RuntimeError("A question is already running.")
            if not self._thread.is_alive():
                raise RuntimeError("The background worker has been shut down.")
            job_id = self._next_job_id
            self._next_job_id += 1
            self._current_job_id = job_id
            self._current_cancel = threading.Event()
            self._jobs.put((job_id, job, self._current_cancel))
        return job_id

    def cancel(self) -> None:
        with self._lock:
            if self._current_cancel is not None:
                self._current_cancel.set()

    def poll(self) -> list:
        """All events posted since the last call, oldest first, without blocking."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait_for_event(self, timeout: float | None = None):
        """The next event, or None after `timeout` seconds (for scripts and tests)."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def run_blocking(self, job, on_progress: Callable[[ProgressEvent], None] | None = None):
        """Submit a job and wait for it; returns the result or raises what the job raised."""
        job_id = self.submit(job)
        while True:
            event = self.wait_for_event()
            if event.job_id != job_id:
                continue
            if isinstance(event, ProgressEvent):
                if on_progress is not None:
                    on_progress(event)
            elif isinstance(event, FinishedEvent):
                return event.result
            elif isinstance(event, FailedEvent):
                raise event.error
            else:
                raise JobCancelled()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Cancel what runs and stop the thread; a job stuck in native code is left to the daemon flag."""
        self.cancel()
        self._jobs.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            job_id, job, cancel_event = item
            final_event = self._execute(job_id, job, cancel_event)
            # Free the slot before announcing the end, so the main thread may submit again as
            # soon as it sees the event.
            with self._lock:
                self._current_job_id = None
                self._current_cancel = None
            self._events.put(final_event)

    def _execute(self, job_id: int, job, cancel_event: threading.Event):
        def progress(done: int, total: int, stage: str) -> None:
            self._events.put(ProgressEvent(job_id, int(done), int(total), str(stage)))
            if cancel_event.is_set():
                raise JobCancelled()

        try:
            result = job(progress, cancel_event)
        except BaseException as error:  # the job's failure is data for the main thread, never a crash here
            if cancel_event.is_set():
                return CancelledEvent(job_id)
            return FailedEvent(job_id, error, traceback.format_exc())
        if cancel_event.is_set():
            # "Cancel" promises that nothing is added to the scene, even if the answer came in
            # between the click and the next check.
            return CancelledEvent(job_id)
        return FinishedEvent(job_id, result)
