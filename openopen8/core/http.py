"""The only outbound HTTP in the project. Every call has a timeout and a size cap, and every network failure
becomes a ``GatewayError`` with a human message that names no host, key or internal address."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from django.conf import settings
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from openopen8.core.errors import GatewayError, UpstreamError, UpstreamTimeout
from openopen8.core.http_pool import BlockedAddress, TooManyRedirects, open_stream
from openopen8.core.multipart import CHUNK, MultipartBody, UploadPart
from openopen8.core.schemas import JSONDict

__all__ = ["UploadPart", "UpstreamRequest", "UpstreamResponse", "fetch", "send", "send_events"]


CREDENTIAL_HEADER = re.compile(r"(?i)auth|key|token|secret|signature")


@dataclass(frozen=True)
class UpstreamRequest:
    """A provider request: a JSON body, or a multipart body of ``form`` fields and ``files``."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: JSONDict | None = None
    auth: tuple[str, str] | None = None
    form: dict[str, str] | None = None
    files: tuple[UploadPart, ...] = ()

    def secrets(self) -> list[str]:
        """The credentials this request carries (its auth pair, and headers that authenticate), which a provider's
        answer must never pass on."""
        found = [f"{self.auth[0]}:{self.auth[1]}"] if self.auth else []
        found += [value for name, value in self.headers.items() if CREDENTIAL_HEADER.search(name)]
        return found


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    content: bytes
    latency_ms: int = 0
    url: str = ""  # the request's, for providers whose answer must be asked for again

    def json(self) -> Any:
        """The body as JSON; raises ``UpstreamError`` (a channel fault) when it is not JSON."""
        try:
            return json.loads(self.content)
        except ValueError:
            raise UpstreamError("The provider sent a malformed answer (not JSON).", channel_fault=True) from None


def _read(resp: BaseHTTPResponse, max_bytes: int, into: IO[bytes]) -> None:
    declared = resp.headers.get("content-length", "")
    too_big = UpstreamError(f"The answer is larger than the {max_bytes}-byte cap.", channel_fault=True)
    if declared.isdecimal() and int(declared) > max_bytes:
        raise too_big
    size = 0
    for chunk in resp.stream(CHUNK, decode_content=True):
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        into.write(chunk)


def _caused_by(error: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``error`` or one it wraps (urllib3 keeps them in ``reason`` or the first argument) is of ``kinds``."""
    while error is not None:
        if isinstance(error, kinds):
            return True
        error = getattr(error, "reason", None) or (error.args[0] if error.args and
                                                   isinstance(error.args[0], BaseException) else None)
    return False


def _broken(error: BaseException, timeout: float, subject: str) -> GatewayError:
    """The channel fault for a connection that failed or broke, from urllib3's exception (or the OS's)."""
    if not isinstance(error, (ProtocolError, OSError)):
        return UpstreamError(f"{subject}'s answer was cut off or could not be read.", channel_fault=True,
                             ambiguous=True)
    if _caused_by(error, (NewConnectionError, NameResolutionError)):
        return UpstreamError(f"{subject} could not be reached.", channel_fault=True)
    if _caused_by(error, (TimeoutError,)):
        return UpstreamTimeout(f"{subject} stopped answering for {timeout:g} s.", channel_fault=True,
                               ambiguous=True)
    return UpstreamError(f"{subject} dropped the connection before answering in full.", channel_fault=True,
                         ambiguous=True)


def _exchange(method: str, url: str, *, timeout: float, max_bytes: int, into: IO[bytes], guarded: bool = False,
              connect_timeout: float | None = None, reader: Callable[[BaseHTTPResponse], bool] | None = None,
              what: str = "image URL", **kwargs: Any) -> tuple[BaseHTTPResponse, int]:
    if not url.startswith(("http://", "https://")):
        raise UpstreamError("The URL is not an http(s) URL.", channel_fault=True)
    connect = min(connect_timeout or settings.OPENOPEN8_CONNECT_TIMEOUT, timeout)
    subject = f"The {what}'s server" if guarded else "The provider"
    started = time.monotonic()
    try:
        resp = open_stream(method, url, timeout=(connect, timeout), guarded=guarded, **kwargs)
        complete = False
        try:
            if reader is not None and reader(resp):
                complete = True
            elif resp.status == 200 or not guarded:
                _read(resp, max_bytes, into)
                complete = True
        finally:
            if not complete:  # a connection with part of an answer left on it must not be used again
                resp.close()
            resp.release_conn()
    except BlockedAddress:
        raise UpstreamError(f"The {what} points to a private or local address, which this gateway does not "
                            "connect to.", channel_fault=True) from None
    except TooManyRedirects:
        raise UpstreamError(f"The {what} redirects too many times.", channel_fault=True) from None
    except ConnectTimeoutError as e:
        if isinstance(e, NewConnectionError):  # urllib3 files a refused connection under connect timeouts
            raise UpstreamError(f"{subject} could not be reached.", channel_fault=True) from None
        raise UpstreamTimeout(f"{subject} did not accept a connection within {connect:g} s.",
                              channel_fault=True) from None
    except ReadTimeoutError:
        raise UpstreamTimeout(f"{subject} did not answer within {timeout:g} s.", channel_fault=True,
                              ambiguous=True) from None
    except (HTTPError, OSError) as e:
        raise _broken(e, timeout, subject) from None
    return resp, int((time.monotonic() - started) * 1000)


def _body(req: UpstreamRequest) -> tuple[dict[str, str], MultipartBody | None]:
    """The request's headers, and its multipart body when it has one (a JSON body goes as ``req.json``)."""
    headers, data = dict(req.headers), None
    if req.files or req.form:
        data = MultipartBody(req.form or {}, req.files)
        headers["Content-Type"] = data.content_type
    return headers, data


def send(req: UpstreamRequest, *, timeout: float, connect_timeout: float | None = None) -> UpstreamResponse:
    """Send one provider request; return its answer whatever the status. Raises ``UpstreamTimeout`` or
    ``UpstreamError`` (channel faults) when there is no complete answer."""
    headers, data = _body(req)
    buffer = io.BytesIO()
    resp, latency = _exchange(req.method, req.url, timeout=timeout, headers=headers, json_body=req.json, data=data,
                              auth=req.auth, max_bytes=settings.OPENOPEN8_MAX_UPSTREAM_BYTES, into=buffer,
                              connect_timeout=connect_timeout)
    return UpstreamResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, buffer.getvalue(),
                            latency, req.url)


def _events(resp: BaseHTTPResponse, max_bytes: int, on_event: Callable[[bytes], None]) -> None:
    """Read server-sent events, handing each event's data to ``on_event`` as it completes; an event may be
    megabytes long (a base64 image), so only the event being read is held, and a data line is copied once."""
    pending, lines, held = bytearray(), list[bytes](), 0
    # read1 returns what has arrived; stream() would wait for a whole chunk, holding small events back.
    while chunk := resp.read1(CHUNK, decode_content=True) or (b"\n" if pending else b""):  # the last line unended
        pending += chunk
        start = 0
        with memoryview(pending) as view:
            while (end := pending.find(b"\n", start)) >= 0:
                stop = end - 1 if end > start and pending[end - 1] == 0x0D else end
                if stop == start:
                    if lines:
                        on_event(lines[0] if len(lines) == 1 else b"\n".join(lines))
                        lines, held = [], 0
                elif pending.startswith(b"data:", start):
                    skip = start + 5 + (stop > start + 5 and pending[start + 5] == 0x20)
                    lines.append(bytes(view[skip:stop]))
                    held += stop - skip
                start = end + 1
        del pending[:start]
        if len(pending) + held > max_bytes:
            raise UpstreamError(f"An event of the answer is larger than the {max_bytes}-byte cap.",
                                channel_fault=True)
    if lines:
        on_event(b"\n".join(lines))


def send_events(req: UpstreamRequest, *, timeout: float, connect_timeout: float | None = None,
                on_event: Callable[[bytes], None]) -> UpstreamResponse:
    """Send a provider request whose answer may stream: a ``text/event-stream`` answer has each event's data handed
    to ``on_event`` as it arrives (the returned answer's content is then empty); any other answer is read whole, as
    ``send`` reads it. ``timeout`` is the longest wait for the next bytes. Raises as ``send`` does, and whatever
    ``on_event`` raises."""
    headers, data = _body(req)
    cap = settings.OPENOPEN8_MAX_UPSTREAM_BYTES

    def reader(resp: BaseHTTPResponse) -> bool:
        if resp.status != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
            return False
        _events(resp, cap, on_event)
        return True

    buffer = io.BytesIO()
    resp, latency = _exchange(req.method, req.url, timeout=timeout, headers=headers, json_body=req.json, data=data,
                              auth=req.auth, max_bytes=cap, into=buffer, connect_timeout=connect_timeout,
                              reader=reader)
    return UpstreamResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, buffer.getvalue(),
                            latency, req.url)


def post_callback(url: str, body: bytes, *, headers: dict[str, str], timeout: float, guarded: bool = True) -> int:
    """POST ``body`` to a client's callback URL, guarded as a client's image URL is fetched (no private addresses,
    every address checked before connecting; ``guarded=False``: a URL the operator configured); return the answer's
    status. Raises ``UpstreamError`` or ``UpstreamTimeout`` when no answer came."""
    resp, _latency = _exchange("POST", url, timeout=timeout, max_bytes=65536, into=io.BytesIO(), guarded=guarded,
                               what="callback URL", headers=headers, data=body)
    return int(resp.status)


def fetch(url: str, *, timeout: float, max_bytes: int, into: IO[bytes], guarded: bool = True) -> None:
    """Download an image URL into ``into``: http(s) only, with a timeout and a size cap, refusing private, loopback
    and link-local addresses unless OPENOPEN8_ALLOW_PRIVATE_URLS is on (``guarded=False``: a URL on a channel's own
    host, which the operator configured).

    Raises ``UpstreamError``/``UpstreamTimeout`` (marked as channel faults; callers fetching a client's URL turn them
    into the client's error).
    """
    resp, _latency = _exchange("GET", url, timeout=timeout, max_bytes=max_bytes, into=into, guarded=guarded,
                               headers={})
    if resp.status != 200:
        raise UpstreamError(f"The image could not be downloaded (HTTP {resp.status}).", channel_fault=True)


