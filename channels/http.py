"""The only outbound HTTP in the project. Every call has a timeout and a size cap, and every network failure
becomes a ``GatewayError`` with a human message that names no host, key or internal address."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import select
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import certifi
import requests
from django.conf import settings
from gevent import monkey  # type: ignore[import-untyped]
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse, Retry, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool, connection_from_url
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import make_headers

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.schemas import JSONDict


@dataclass(frozen=True)
class UploadPart:
    """A file sent in a multipart body, read from its (seekable, local) file as the body streams out."""

    field: str
    filename: str
    file: IO[bytes]
    content_type: str


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
            raise UpstreamError("The provider sent a malformed answer (not JSON).", channel_fault=True,
                                retryable=True) from None


class MultipartBody:
    """A multipart/form-data body that streams its files from disk, with its length known up front, so an upload
    is never held whole in memory on its way to a provider."""

    def __init__(self, form: dict[str, str], files: tuple[UploadPart, ...]) -> None:
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[bytes | UploadPart] = []
        for name, value in form.items():
            self._parts.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"'
                               f"\r\n\r\n{value}\r\n".encode())
        for part in files:
            self._parts.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(part.field)}"; '
                               f'filename="{_quote(part.filename)}"\r\nContent-Type: {part.content_type}\r\n\r\n'
                               .encode())
            self._parts.extend([part, b"\r\n"])
        self._parts.append(f"--{self.boundary}--\r\n".encode())

    def __len__(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.file.seek(0, io.SEEK_END) for p in self._parts)

    def __iter__(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            part.file.seek(0)
            while chunk := part.file.read(CHUNK):
                yield chunk


def _quote(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class BlockedAddress(Exception):
    """A fetch reached an address the operator has not allowed (private, loopback, link-local, ...)."""


def _check_peer(sock: socket.socket) -> None:
    address = ipaddress.ip_address(sock.getpeername()[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not address.is_global and not settings.OPENOPEN8_ALLOW_PRIVATE_URLS:
        sock.close()
        raise BlockedAddress(str(address))


class _GuardedHTTPConnection(HTTPConnection):
    # The check runs on the socket actually connected, so a name that resolves differently later cannot slip by.
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


@cache
def _proxies_configured() -> bool:
    return bool(urllib.request.getproxies())


_local = threading.local()
CHUNK = 256 * 1024


def _session(guarded: bool = False) -> requests.Session:
    # A session per thread (and kind) for what goes through Session.request: image URLs (the guarded one refuses
    # addresses the operator has not allowed and ignores proxy settings) and providers behind a proxy.
    name = "guarded" if guarded else "session"
    session: requests.Session | None = getattr(_local, name, None)
    if session is None:
        session = requests.Session()
        # Reading proxy settings from the environment on every request costs more than the request itself here:
        # only providers behind a configured proxy pay for it.
        session.trust_env = not guarded and _proxies_configured()
        if guarded:
            session.max_redirects = 3
            for scheme in ("http://", "https://"):
                session.mount(scheme, _GuardedAdapter())
        setattr(_local, name, session)
    return session


def _read(resp: BaseHTTPResponse, max_bytes: int, into: IO[bytes]) -> None:
    declared = resp.headers.get("content-length", "")
    too_big = UpstreamError(f"The answer is larger than the {max_bytes}-byte cap.", channel_fault=True)
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    size = 0
    for chunk in resp.stream(CHUNK, decode_content=True):
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        into.write(chunk)


def _never_connected(error: BaseException | None) -> bool:
    """True when a connection error happened before anything was sent (refused, unresolvable, unreachable)."""
    while error is not None:
        if isinstance(error, (NewConnectionError, NameResolutionError)):
            return True
        error = getattr(error, "reason", None) or (error.args[0] if error.args and
                                                   isinstance(error.args[0], BaseException) else None)
    return False


# The operating system's poll, whatever gevent patched: urllib3 asks whether a pooled connection was closed by the
# provider before every reuse, with a poll that should not wait, and gevent's poll still gives every other request of
# the worker its turn first. Under load that turn took 30-66 ms, at the start of every provider call (bench/RESULTS.md).
_os_poll = monkey.get_original("select", "poll")


class _ReusedAtOnce:
    """A provider connection whose reuse check answers at once."""

    sock: socket.socket | None

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        poller = _os_poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)  # readable while idle: the provider closed it (or sent what nobody asked for)


class _ProviderHTTPConnection(_ReusedAtOnce, HTTPConnection):
    pass


class _ProviderHTTPSConnection(_ReusedAtOnce, HTTPSConnection):
    pass


_DEFAULT_HEADERS = dict(requests.utils.default_headers())
_NO_RETRIES = Retry(total=False, redirect=False)  # what ``retries=False`` means, made once instead of twice a call
_pools_lock = threading.Lock()
_pools: tuple[int, dict[str, HTTPConnectionPool]] | None = None
MAX_ORIGINS = 64


def _provider_pool(origin: str) -> HTTPConnectionPool:
    """The process's connection pool for one provider (``scheme://host:port``), shared by all its threads
    (urllib3's pools are thread-safe). A pool per thread kept a connection per thread per provider, and with hundreds
    of threads taking turns a thread's connection had usually gone stale by its next call: a new TCP and TLS handshake
    instead of a warm connection. Made in the process that uses it (keyed by pid), so a fork never shares sockets.
    Kept here rather than in urllib3's PoolManager, whose per-call URL parsing and pool-key building cost 2 % of a
    generation's instructions (bench/RESULTS.md); like it, at most ``MAX_ORIGINS`` are kept, the oldest closed first."""
    global _pools
    pools = _pools[1] if _pools is not None and _pools[0] == os.getpid() else None
    pool = pools.get(origin) if pools is not None else None
    if pool is None:
        with _pools_lock:
            if _pools is None or _pools[0] != os.getpid():
                _pools = (os.getpid(), {})
            pools = _pools[1]
            pool = pools.get(origin)
            if pool is None:
                from channels.adapters import MAX_PARALLEL_CALLS  # here: the adapters import this module

                size = settings.OPENOPEN8_PROVIDER_POOL_SIZE or settings.OPENOPEN8_WORKER_REQUESTS * MAX_PARALLEL_CALLS
                if len(pools) >= MAX_ORIGINS:
                    pools.pop(next(iter(pools))).close()
                # Calls beyond ``size`` to one host at once get a connection of their own, closed after use. TLS is
                # checked against the same CA bundle as requests uses.
                https = origin.startswith("https:")
                extra = {"ca_certs": certifi.where()} if https else {}
                pool = pools[origin] = connection_from_url(origin, maxsize=size, block=False, **extra)
                pool.ConnectionCls = _ProviderHTTPSConnection if https else _ProviderHTTPConnection
    return pool


def _open(method: str, url: str, *, timeout: tuple[float, float], guarded: bool, headers: dict[str, str],
          json_body: Any = None, data: MultipartBody | None = None,
          auth: tuple[str, str] | None = None) -> BaseHTTPResponse:
    """The answer's head, its body left to stream. Raises requests' or urllib3's exceptions."""
    if guarded or _proxies_configured():  # image URLs follow redirects; proxies come from the environment
        return _session(guarded).request(method, url, timeout=timeout, stream=True, headers=headers, json=json_body,
                                         data=data, auth=auth).raw
    # A provider call follows no redirects and keeps no cookies (one provider's cookies must not reach another), so
    # it goes straight to urllib3's pool: requests' preparing of the request and wrapping of the answer cost a third
    # of the call (bench/RESULTS.md).
    headers = {**_DEFAULT_HEADERS, **headers}
    body: Any = None
    if data is not None:
        headers["Content-Length"], body = str(len(data)), data
    elif json_body is not None:
        headers.setdefault("Content-Type", "application/json")
        body = json.dumps(json_body, allow_nan=False).encode()
    origin, target, userinfo = _split(url)
    if auth is not None or userinfo:  # credentials in the URL count, as requests counted them
        headers.update(make_headers(basic_auth=f"{auth[0]}:{auth[1]}" if auth else unquote(userinfo)))
    return _provider_pool(origin).urlopen(method, target, body=body, headers=headers, redirect=False,
                                          retries=_NO_RETRIES, preload_content=False,
                                          timeout=Timeout(connect=timeout[0], read=timeout[1]))


def _split(url: str) -> tuple[str, str, str]:
    """``scheme://user:password@host:port/path?query`` as ``scheme://host:port``, ``/path?query`` and
    ``user:password``."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    return f"{parts.scheme}://{host}", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), userinfo


def _broken(error: BaseException, timeout: float) -> GatewayError:
    """The channel fault for a connection that failed or broke, from requests' or urllib3's exception."""
    dropped = isinstance(error, (requests.ConnectionError, ProtocolError)) or (
        isinstance(error, OSError) and not isinstance(error, requests.RequestException))
    if not dropped:
        return UpstreamError("The provider's answer was cut off or could not be read.", channel_fault=True,
                             ambiguous=True)
    if _never_connected(error):
        return UpstreamError("The provider could not be reached.", channel_fault=True, retryable=True)
    if "timed out" in str(error).lower():
        return UpstreamTimeout(f"The provider stopped answering for {timeout:g} s.", channel_fault=True,
                               ambiguous=True)
    return UpstreamError("The provider dropped the connection before answering in full.", channel_fault=True,
                         ambiguous=True)


def _exchange(method: str, url: str, *, timeout: float, max_bytes: int, into: IO[bytes], guarded: bool = False,
              connect_timeout: float | None = None, **kwargs: Any) -> tuple[BaseHTTPResponse, int]:
    if not url.startswith(("http://", "https://")):
        raise UpstreamError("The URL is not an http(s) URL.", channel_fault=True)
    connect = min(connect_timeout or settings.OPENOPEN8_CONNECT_TIMEOUT, timeout)
    started = time.monotonic()
    try:
        resp = _open(method, url, timeout=(connect, timeout), guarded=guarded, **kwargs)
        complete = False
        try:
            if resp.status == 200 or not guarded:
                _read(resp, max_bytes, into)
                complete = True
        finally:
            if not complete:  # a connection with part of an answer left on it must not be used again
                resp.close()
            resp.release_conn()
    except BlockedAddress as e:
        raise UpstreamError(f"The image URL points to a private or local address ({e}), which this gateway does "
                            "not fetch from.", channel_fault=True) from None
    except requests.TooManyRedirects:
        raise UpstreamError("The image URL redirects too many times.", channel_fault=True) from None
    except (requests.ConnectTimeout, ConnectTimeoutError) as e:
        if isinstance(e, NewConnectionError):  # urllib3 files a refused connection under connect timeouts
            raise UpstreamError("The provider could not be reached.", channel_fault=True, retryable=True) from None
        raise UpstreamTimeout(f"The provider did not accept a connection within {connect:g} s.", channel_fault=True,
                              retryable=True) from None
    except (requests.ReadTimeout, ReadTimeoutError):
        raise UpstreamTimeout(f"The provider did not answer within {timeout:g} s.", channel_fault=True,
                              ambiguous=True) from None
    except (requests.RequestException, HTTPError, OSError) as e:
        raise _broken(e, timeout) from None
    return resp, int((time.monotonic() - started) * 1000)


def send(req: UpstreamRequest, *, timeout: float, connect_timeout: float | None = None) -> UpstreamResponse:
    """Send one provider request; return its answer whatever the status. Raises ``UpstreamTimeout`` or
    ``UpstreamError`` (channel faults) when there is no complete answer."""
    headers, data = dict(req.headers), None
    if req.files or req.form:
        data = MultipartBody(req.form or {}, req.files)
        headers["Content-Type"] = data.content_type
    buffer = io.BytesIO()
    resp, latency = _exchange(req.method, req.url, timeout=timeout, headers=headers, json_body=req.json, data=data,
                              auth=req.auth, max_bytes=settings.OPENOPEN8_MAX_UPSTREAM_BYTES, into=buffer,
                              connect_timeout=connect_timeout)
    return UpstreamResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, buffer.getvalue(),
                            latency, req.url)


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
        raise UpstreamError(f"The image could not be downloaded (HTTP {resp.status}).", channel_fault=True,
                            retryable=True)


