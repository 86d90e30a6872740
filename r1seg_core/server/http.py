"""The HTTP layer of `r1seg serve`: uvicorn's h11 protocol with request timeouts and JSON errors.

uvicorn (0.55) times out only idle keep-alive connections, so a client could hold a connection forever by
sending its headers or its body a byte at a time. Here, with `timeout` = r1seg serve --request-timeout:
- a request's headers must be complete within `timeout` of the connection (or of the previous response);
- a body must keep moving: at least protocol.BODY_MIN_BYTES (or the rest of it) in every `timeout` seconds,
  except while the server itself has stopped reading (an upload waiting for a decode slot);
and the requests h11 refuses (malformed, too large headers) get a JSON 400 like every other error.
"""
from __future__ import annotations

import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from . import protocol

log = logging.getLogger("r1seg.serve")

# Checks per timeout: a stalled request is closed between 1 and 1.25 timeouts after it stalled.
_CHECKS_PER_TIMEOUT = 4


def _json_reply(status: int, kind: str, detail: str) -> bytes:
    body = json.dumps({"error": kind, "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    request_timeout = protocol.DEFAULT_REQUEST_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._received = 0
        self._idle_since = time.monotonic()            # waiting for a request's headers since
        self._received_when_idle = 0                   # bytes received by then
        self._answered = False
        self._body_mark = (time.monotonic(), 0)        # (when, bytes received) at the body's last progress
        self._watch = self.loop.call_later(self.request_timeout / _CHECKS_PER_TIMEOUT, self._check)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._idle_since, self._received_when_idle, self._answered = time.monotonic(), self._received, True
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._watch.cancel()
        super().connection_lost(exc)

    def _check(self) -> None:
        if self.transport.is_closing():
            return
        now = time.monotonic()
        state = self.conn.their_state
        answering = self.cycle is not None and not self.cycle.response_complete
        if state is h11.IDLE and not answering and now - self._idle_since >= self.request_timeout:
            # An idle keep-alive connection just closes (as uvicorn's own timer does); a request cut short is told.
            partial = self._received > self._received_when_idle or not self._answered
            self._close(408 if partial else None, f"no complete request headers within {self.request_timeout:g} s")
            return
        if state is h11.SEND_BODY:
            when, mark = self._body_mark
            if self.flow.read_paused or self._received - mark >= protocol.BODY_MIN_BYTES:
                self._body_mark = (now, self._received)
            elif now - when >= self.request_timeout:
                self._close(408, f"the request body stalled: less than {protocol.BODY_MIN_BYTES} bytes arrived in "
                                 f"{self.request_timeout:g} s")
                return
        else:
            self._body_mark = (now, self._received)
        self._watch = self.loop.call_later(self.request_timeout / _CHECKS_PER_TIMEOUT, self._check)

    def _close(self, status: int | None, detail: str) -> None:
        if status is None:
            self.transport.close()
            return
        log.info("closed a connection from %s: %s", self.client[0] if self.client else "?", detail)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_json_reply(status, protocol.ERROR_TIMEOUT, detail))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # h11 refused the request (malformed, or headers over its limit): the same JSON as every other error.
        self.transport.write(_json_reply(400, protocol.ERROR_BAD_REQUEST, f"invalid HTTP request ({msg.rstrip('.')})"))
        self.transport.close()


def guarded_protocol(request_timeout: float) -> type:
    """The protocol class for uvicorn.Config(http=...), with this server's timeout."""
    return type("R1SegH11Protocol", (GuardedH11Protocol,), {"request_timeout": float(request_timeout)})
