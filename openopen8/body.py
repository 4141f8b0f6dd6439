"""A deadline on the request body, below Django: a client that drips its body (or stops sending) holds a connection
and its worker's slot for at most ``OPENOPEN8_BODY_TIMEOUT`` seconds, then gets OpenAI's JSON 408.

Under gunicorn the socket is in ``environ["gunicorn.socket"]``. A read that would pass the deadline is cut off (a
gevent timeout on gevent workers; on threads a watchdog shuts the socket's read side, which ends the read), and the
read side is shut, so gunicorn does not wait for the rest of that body to keep the connection alive; it closes it.
The same happens to a body the application answered without reading (a request refused before its body was read)."""

from __future__ import annotations

import functools
import heapq
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from openopen8.client import WrappedResponse
from openopen8.core.errors import RequestTimeout

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Any]  # the response iterable, which may have close()


class DeadlineInput:
    """``wsgi.input`` whose reads end by ``deadline`` (monotonic) or raise ``RequestTimeout``."""

    def __init__(self, raw: Any, sock: socket.socket, *, deadline: float, length: int, seconds: float,
                 gevent_timeout: Any) -> None:
        self.raw, self.sock, self.deadline, self.left, self.seconds = raw, sock, deadline, length, seconds
        self._gevent_timeout = gevent_timeout
        self.watched = self.finished = False

    @property
    def complete(self) -> bool:
        return self.left <= 0

    def read(self, size: int = -1) -> bytes:
        return self._timed(self.raw.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._timed(self.raw.readline, size)

    def _timed(self, read: Callable[[int], bytes], size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._expire()
        if self._gevent_timeout is not None:
            try:
                with self._gevent_timeout(remaining, TimeoutError):
                    data = read(size)
            except TimeoutError:
                self._expire()
        else:
            # A thread cannot be interrupted: the watchdog shuts the read side at the deadline, which ends the read.
            _watchdog().watch(self)
            try:
                data = read(size)
            except OSError:
                if time.monotonic() >= self.deadline:
                    self._expire()
                raise
            if time.monotonic() >= self.deadline:
                self._expire()
        self.left -= len(data)
        return data

    def _expire(self) -> None:
        self.close_read()
        raise RequestTimeout(f"The request body did not arrive within {self.seconds:g} s.")

    def close_read(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class _Watchdog:
    """One thread per process that shuts the read side of bodies still arriving at their deadline (threaded
    workers, whose blocked reads nothing else can end)."""

    def __init__(self) -> None:
        # Weak references: a request that ended lets its body go at once, not at its deadline.
        self._due: list[tuple[float, int, weakref.ref[DeadlineInput]]] = []
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="body-deadlines", daemon=True).start()

    def watch(self, body: DeadlineInput) -> None:
        if body.watched:
            return
        body.watched = True
        with self._wake:
            heapq.heappush(self._due, (body.deadline, id(body), weakref.ref(body)))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                body = heapq.heappop(self._due)[2]()
            if body is not None and not body.complete and not body.finished:
                body.close_read()


@functools.cache
def _watchdog() -> _Watchdog:
    return _Watchdog()


class _Closing(WrappedResponse):
    """The response, which on close shuts the read side of a body the application left unread."""

    def __init__(self, response: Iterable[bytes], body: DeadlineInput) -> None:
        super().__init__(response)
        self.body = body

    def closed(self) -> None:
        self.body.finished = True  # the watchdog leaves the connection alone from now on
        if not self.body.complete:
            self.body.close_read()


def body_deadline(app: WSGIApp, *, seconds: float, gevent: bool) -> WSGIApp:
    """``app`` with a deadline on every request body that arrives through gunicorn."""
    gevent_timeout = None
    if gevent:
        from gevent import Timeout  # type: ignore[import-untyped]

        gevent_timeout = Timeout

    def deadlined(environ: dict[str, Any], start_response: StartResponse) -> Any:
        sock = environ.get("gunicorn.socket")
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if sock is None or not (chunked or (length.isdecimal() and int(length) > 0)):
            return app(environ, start_response)
        body = DeadlineInput(environ["wsgi.input"], sock, deadline=time.monotonic() + seconds,
                             length=int(length) if length.isdecimal() else 1 << 62, seconds=seconds,
                             gevent_timeout=gevent_timeout)
        environ["wsgi.input"] = body
        return _Closing(app(environ, start_response), body)

    return deadlined
