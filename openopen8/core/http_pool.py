"""The two ways a request leaves the process, and the connections they keep: provider calls straight through a
urllib3 pool per provider, and image URLs (and providers behind a configured proxy) through a requests session that
follows redirects and refuses private addresses. Both raise urllib3's exceptions only (requests' are translated
here), so ``http.py`` maps failures in one place."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import threading
import urllib.request
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import unquote, urlsplit

import certifi
import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3 import BaseHTTPResponse, Retry, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool, connection_from_url
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import make_headers

from openopen8.core.multipart import MultipartBody

# The most provider calls one request makes at once (``channels.adapters.call`` splits ``n`` into that many); the
# provider pools are sized for every request a worker holds doing so.
MAX_PARALLEL_CALLS = 4
MAX_ORIGINS = 64


class BlockedAddress(Exception):
    """A fetch would reach an address the operator has not allowed (private, loopback, link-local, ...). It names
    no address: the client must not learn what the gateway's network holds."""


class TooManyRedirects(Exception):
    """An image URL redirected more than the session allows."""


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _carried(address: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address it carries: IPv4-mapped, 6to4, NAT64, IPv4-compatible and Teredo forms
    reach the IPv4 address inside them."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        found += [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
        found += list(address.teredo or ())
        if any(address in net for net in _NAT64) or address in _IPV4_COMPATIBLE:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def blocked(address: IPAddress) -> bool:
    """Whether a fetch may not go to this address: private, loopback, link-local, reserved, ..., in any form."""
    return not settings.OPENOPEN8_ALLOW_PRIVATE_URLS and any(not a.is_global for a in _carried(address))


def _check_host(host: str, port: int) -> None:
    """Refuse before connecting when the name (or literal address) resolves to a blocked address, so a refused
    private address and a closed private port look the same. A name that does not resolve is left to the connect,
    which reports it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return
    if any(blocked(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos):
        raise BlockedAddress()


def url_refused(url: str) -> bool:
    """Whether a fetch or a callback to ``url`` would be refused for its address (checked before it is taken)."""
    parts = urlsplit(url)
    try:
        _check_host(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except (BlockedAddress, ValueError):
        return True
    return False


def _check_peer(sock: socket.socket) -> None:
    # Checked again on the socket actually connected: a name that resolves differently the second time (DNS
    # rebinding) cannot slip by.
    if blocked(ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])):
        sock.close()
        raise BlockedAddress()


class _Guarded:
    """A connection that checks the address before connecting and the peer after."""

    def _new_conn(self) -> socket.socket:
        conn: Any = self  # one of urllib3's connections, below this in the MRO
        _check_host(conn._dns_host, conn.port or conn.default_port)
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        _check_peer(sock)
        return sock


class _GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


@cache
def proxies_configured() -> bool:
    return bool(urllib.request.getproxies())


_local = threading.local()


def _session(guarded: bool) -> requests.Session:
    # A session per thread (and kind): image URLs (the guarded one refuses addresses the operator has not allowed and
    # ignores proxy settings) and providers behind a proxy.
    name = "guarded" if guarded else "session"
    session: requests.Session | None = getattr(_local, name, None)
    if session is None:
        session = requests.Session()
        # Reading proxy settings from the environment costs more than a request: only proxied providers pay for it.
        session.trust_env = not guarded and proxies_configured()
        if guarded:
            session.max_redirects = 3
            for scheme in ("http://", "https://"):
                session.mount(scheme, _GuardedAdapter())
        setattr(_local, name, session)
    return session


def _urllib3_error(error: requests.RequestException) -> BaseException:
    """The urllib3 exception behind one of requests', so that failures are read by one set of rules."""
    if isinstance(error, requests.TooManyRedirects):
        return TooManyRedirects()
    inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
    if isinstance(inner, MaxRetryError) and inner.reason is not None:
        inner = inner.reason
    if isinstance(error, requests.ConnectTimeout):
        return inner if isinstance(inner, ConnectTimeoutError) else ConnectTimeoutError(str(error))
    if isinstance(error, requests.ReadTimeout):
        return ReadTimeoutError(None, "", str(error))  # type: ignore[arg-type]
    if isinstance(error, requests.ConnectionError):
        return inner if isinstance(inner, (ProtocolError, OSError, NewConnectionError)) else ProtocolError(str(error),
                                                                                                          inner)
    return HTTPError(str(error))


@cache
def _os_poll() -> Callable[[], Any]:
    """The operating system's poll, whatever gevent patched: urllib3 asks whether a pooled connection was closed
    before every reuse, with a poll that should not wait, and gevent's poll gives every other request of the worker
    its turn first (bench/RESULTS.md)."""
    if settings.OPENOPEN8_WORKER_CLASS == "gevent":
        from gevent import monkey  # type: ignore[import-untyped]

        poll: Callable[[], Any] = monkey.get_original("select", "poll")
        return poll
    return select.poll


class _ReusedAtOnce:
    """A provider connection whose reuse check answers at once."""

    sock: socket.socket | None

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        poller = _os_poll()()
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


def pools_reset() -> None:
    """Close and forget this process's provider pools (tests; a changed setting)."""
    global _pools
    with _pools_lock:
        if _pools is not None:
            for pool in _pools[1].values():
                pool.close()
        _pools = None


def pool_origins() -> list[str]:
    """The providers this process keeps a pool for, oldest first."""
    pools = _pools
    return list(pools[1]) if pools is not None and pools[0] == os.getpid() else []


def provider_pool(origin: str) -> HTTPConnectionPool:
    """The process's connection pool for one provider (``scheme://host:port``), shared by all its threads (urllib3's
    pools are thread-safe), so a provider's connections stay warm however many requests take turns. Made in the
    process that uses it (keyed by pid), so a fork never shares sockets. Kept here rather than in urllib3's
    PoolManager, whose per-call URL parsing costs (bench/RESULTS.md); like it, at most ``MAX_ORIGINS`` are kept, the
    oldest closed first."""
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


def open_stream(method: str, url: str, *, timeout: tuple[float, float], guarded: bool, headers: dict[str, str],
                json_body: Any = None, data: MultipartBody | bytes | None = None,
                auth: tuple[str, str] | None = None) -> BaseHTTPResponse:
    """The answer's head, its body left to stream. Raises urllib3's exceptions, ``BlockedAddress`` or
    ``TooManyRedirects``."""
    if guarded or proxies_configured():  # image URLs follow redirects; proxies come from the environment
        try:
            return _session(guarded).request(method, url, timeout=timeout, stream=True, headers=headers,
                                             json=json_body, data=data, auth=auth).raw
        except requests.RequestException as error:
            raise _urllib3_error(error) from error
    # A provider call follows no redirects and keeps no cookies (one provider's cookies must not reach another), so
    # it goes straight to urllib3's pool: requests' preparing of the request costs (bench/RESULTS.md).
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
    return provider_pool(origin).urlopen(method, target, body=body, headers=headers, redirect=False,
                                         retries=_NO_RETRIES, preload_content=False,
                                         timeout=Timeout(connect=timeout[0], read=timeout[1]))


def _split(url: str) -> tuple[str, str, str]:
    """``scheme://user:password@host:port/path?query`` as ``scheme://host:port``, ``/path?query`` and
    ``user:password``."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    return f"{parts.scheme}://{host}", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), userinfo
