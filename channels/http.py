"""The only outbound HTTP in the project. Every call has a timeout and a size cap, and every network failure
becomes a ``GatewayError`` with a human message that names no host, key or internal address."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from django.conf import settings

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.schemas import JSONDict


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: JSONDict | None = None
    auth: tuple[str, str] | None = None


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    content: bytes
    latency_ms: int = 0

    def json(self) -> Any:
        """The body as JSON; raises ``UpstreamError`` (a channel fault) when it is not JSON."""
        try:
            return json.loads(self.content)
        except ValueError:
            raise UpstreamError("The provider sent a malformed answer (not JSON).", channel_fault=True,
                                retryable=True) from None


_local = threading.local()
CHUNK = 256 * 1024


def _session() -> requests.Session:
    # One pooled session per thread: connections to a provider are reused across requests.
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def _read(resp: requests.Response, max_bytes: int) -> bytes:
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UpstreamError(f"The provider's answer is larger than the {max_bytes}-byte cap.", channel_fault=True)
    chunks, size = [], 0
    for chunk in resp.iter_content(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise UpstreamError(f"The provider's answer is larger than the {max_bytes}-byte cap.", channel_fault=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _exchange(method: str, url: str, *, timeout: float, max_bytes: int,
              **kwargs: Any) -> tuple[requests.Response, bytes, int]:
    if not url.startswith(("http://", "https://")):
        raise UpstreamError("The channel's URL is not an http(s) URL.", channel_fault=True)
    connect = min(settings.OPENOPEN8_CONNECT_TIMEOUT, timeout)
    started = time.monotonic()
    try:
        with _session().request(method, url, timeout=(connect, timeout), stream=True, **kwargs) as resp:
            content = _read(resp, max_bytes)
    except requests.ConnectTimeout:
        raise UpstreamTimeout(f"The provider did not accept a connection within {connect:g} s.", channel_fault=True,
                              retryable=True) from None
    except requests.ReadTimeout:
        raise UpstreamTimeout(f"The provider did not answer within {timeout:g} s.", channel_fault=True,
                              retryable=True) from None
    except requests.ConnectionError as e:
        timed_out = "timed out" in str(e).lower()
        error = UpstreamTimeout if timed_out else UpstreamError
        what = "stopped answering" if timed_out else "could not be reached or dropped the connection"
        raise error(f"The provider {what}.", channel_fault=True, retryable=True) from None
    except requests.RequestException:
        raise UpstreamError("The provider's answer could not be read.", channel_fault=True, retryable=True) from None
    return resp, content, int((time.monotonic() - started) * 1000)


def send(req: UpstreamRequest, *, timeout: float) -> UpstreamResponse:
    """Send one provider request; return its answer whatever the status. Raises ``UpstreamTimeout`` or
    ``UpstreamError`` (channel faults) when there is no complete answer."""
    resp, content, latency = _exchange(req.method, req.url, timeout=timeout, headers=req.headers, json=req.json,
                                       auth=req.auth, allow_redirects=False,
                                       max_bytes=settings.OPENOPEN8_MAX_UPSTREAM_BYTES)
    headers = {k.lower(): v for k, v in resp.headers.items()}
    return UpstreamResponse(resp.status_code, headers, content, latency)


def fetch(url: str, *, timeout: float) -> bytes:
    """Download an image a provider pointed to; return its bytes.
    Raises ``UpstreamError``/``UpstreamTimeout`` (channel faults) on failure or when it exceeds the image cap."""
    resp, content, _latency = _exchange("GET", url, timeout=timeout, max_bytes=settings.OPENOPEN8_MAX_IMAGE_BYTES)
    if resp.status_code != 200:
        raise UpstreamError(f"The provider's image could not be downloaded (HTTP {resp.status_code}).",
                            channel_fault=True, retryable=True)
    return content


