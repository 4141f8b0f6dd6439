"""The client's end of a request under gunicorn: whether the client has gone away, and whether the answer reached
it. ``delivery_hooks`` wraps the WSGI application: a request may ask to be told, once gunicorn has written (or
failed to write) its answer, whether it was delivered (``ClientConnection.on_delivery``).

A client that hangs up shows as end-of-file on its socket, which a peek sees without reading anything; a write to
it then fails, or goes nowhere. Elsewhere (the test suite's client) there is no socket: the client never goes."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

HOOKS = "openopen8.delivery_hooks"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Any]
DeliveryHook = Callable[[bool], None]


def _hung_up(sock: Any) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


class ClientConnection:
    """One request's client, as the application sees it."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self._sock = environ.get("gunicorn.socket")
        self._hooks: list[DeliveryHook] | None = environ.get(HOOKS)

    def gone(self) -> bool:
        """Whether the client has hung up (never, without a socket)."""
        return self._sock is not None and _hung_up(self._sock)

    def on_delivery(self, hook: DeliveryHook) -> bool:
        """Call ``hook(delivered)`` once the answer was written, or failed to be; ``False`` (and no call) where no
        server reports that."""
        if self._hooks is None:
            return False
        self._hooks.append(hook)
        return True


class WrappedResponse:
    """A WSGI response iterable around the application's, which does ``closed()`` once the server has closed it
    (after writing it, or failing to)."""

    def __init__(self, response: Iterable[bytes]) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.response)

    def close(self) -> None:
        try:
            close = getattr(self.response, "close", None)
            if close is not None:
                close()
        finally:
            self.closed()

    def closed(self) -> None:
        """What to do once the server is done with the response."""


class _Delivery(WrappedResponse):
    """The response, which tells the request's hooks whether all of it was written to a client still there."""

    def __init__(self, response: Iterable[bytes], sock: Any, hooks: list[DeliveryHook]) -> None:
        super().__init__(response)
        self.sock, self.hooks = sock, hooks
        self.delivered = False

    def __iter__(self) -> Iterator[bytes]:
        there = not _hung_up(self.sock)  # a write to a client that hung up may still "succeed"
        yield from self.response
        self.delivered = there  # every chunk was handed to the server and written

    def closed(self) -> None:
        for hook in self.hooks:
            try:
                hook(self.delivered)
            except Exception:  # the answer is gone; what is left must not take the worker down
                log.exception("a delivery hook failed")


def delivery_hooks(app: WSGIApp) -> WSGIApp:
    """``app`` whose requests may ask whether their answer reached the client (under gunicorn)."""

    def hooked(environ: dict[str, Any], start_response: StartResponse) -> Any:
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return app(environ, start_response)
        hooks: list[DeliveryHook] = []
        environ[HOOKS] = hooks
        response = app(environ, start_response)
        return _Delivery(response, sock, hooks) if hooks else response

    return hooked
