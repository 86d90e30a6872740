"""What a question reports to the panel, one event per poll: progress, then one of the terminal events.

ServerQuestion (server_client.py) makes them from the server's replies; the panel's timer reads them. The
`job_id` is the question's number, so events of an abandoned question are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
