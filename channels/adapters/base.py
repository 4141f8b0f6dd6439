"""The adapter interface and the plain values that flow through it.

An adapter translates; it does no I/O. ``build_request`` turns an OpenAI-shaped request into the provider's HTTP
request, ``parse_response`` turns the provider's answer into OpenAI's shape, and ``parse_error`` decides whose fault
a failure is (the client's: no failover; the channel's: fail over).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openopen8.core import http
from openopen8.core.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamKeyRejected,
)
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageRequest, ImagesResponse, JSONDict


@dataclass(frozen=True)
class ChannelTarget:
    """One upstream channel as adapters see it: no ORM row, no settings."""

    id: int
    name: str
    kind: str
    base_url: str
    api_key: str
    config: Any
    model_map: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    weight: int = 1
    priority: int = 0
    endpoints: frozenset[str] = frozenset({"generations"})
    max_input_images: int = 0
    file_fields: frozenset[str] = frozenset()
    spare_keys: int = 0
    connect_timeout: float | None = None
    safe_to_retry: bool = False
    images_per_minute: int | None = None
    max_in_flight: int | None = None
    end_user: str = "client"  # what goes to the provider as user / safety_identifier: client, token or none
    demo: bool = False  # the demo channel, for keys without a budget only

    def provider_model(self, model: str) -> str:
        return self.model_map.get(model, model)


def only_keys(raw: JSONDict, allowed: Iterable[str]) -> None:
    """Refuse a channel config with keys the adapter does not know (a typo would otherwise be silently ignored)."""
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})")


@dataclass(frozen=True)
class Poll:
    """Not done yet: send ``request`` after ``after`` seconds (more as polls go on) and parse its answer again."""

    request: UpstreamRequest
    after: float = 1.0


def retry_after(resp: UpstreamResponse) -> int | None:
    value = resp.headers.get("retry-after", "")
    return int(float(value)) if value.replace(".", "", 1).isdecimal() else None


class Adapter:
    """Base of all adapters. Subclasses set ``Config`` and implement the three translation methods."""

    needs_base_url: ClassVar[bool] = True
    # What the adapter can translate: endpoints, input images per request, and which files (image, mask, markup).
    endpoints: ClassVar[frozenset[str]] = frozenset({"generations", "edits", "variations"})
    max_input_images: ClassVar[int] = 16
    file_fields: ClassVar[frozenset[str]] = frozenset({"image", "mask", "markup"})
    # How a request travels. Only the placeholder, which has no provider to call, replaces it.
    transport = staticmethod(http.send)
    # Whether the provider streams OpenAI's image events when asked (``stream: true``); the others' images are
    # turned into events by the gateway when they are ready.
    streams: ClassVar[bool] = False
    # The keys of the channel's config this type reads (the console lists them for the type chosen).
    config_keys: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    def parse_config(raw: JSONDict) -> Any:
        """Check a channel's per-type config; return a frozen value. Raises ``ValueError`` with a readable message."""
        if raw:
            raise ValueError(f"this channel type takes no config, got keys: {', '.join(sorted(raw))}")
        return None

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        """The provider request for ``req`` on ``target``. Raises ``InvalidRequest`` if it cannot be expressed."""
        raise NotImplementedError

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse | Poll:
        """OpenAI's shape from a 2xx answer, or, for a provider that works asynchronously, the next request to send
        (``Poll``). Raises ``UpstreamError`` (channel fault) on a malformed answer."""
        raise NotImplementedError

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        """How many images one provider call can make; the gateway makes parallel calls for the rest of ``n``."""
        return 10

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        """A cheap request that shows whether the provider is up and takes the key (no image made); ``None`` when
        there is nothing to ask."""
        return None

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        """The error for a non-2xx answer (its message is masked of secrets by the caller). The default reads
        OpenAI's error shape."""
        error: dict[str, Any] = {}
        try:
            body = json.loads(resp.content)
            found = body.get("error") if isinstance(body, dict) else None
            error = found if isinstance(found, dict) else {"message": str(found or "")}
        except ValueError:
            pass
        message = str(error.get("message") or f"HTTP {resp.status}")
        return classify(resp, message, code=error.get("code"), param=error.get("param"), kind=error.get("type"))


# Codes with which a provider says the key itself is bad (revoked, mistyped, its account closed).
KEY_CODES = {"invalid_api_key", "invalid_authentication", "account_deactivated", "InvalidApiKey", "AuthenticationError",
             "API_KEY_INVALID", "Unauthenticated"}
REFUSAL_CODES = {"content_policy_violation", "moderation_blocked", "contentFilter", "content_filter",
                 "ResponsibleAIPolicyViolation", "content_moderation", "DataInspectionFailed", "IPInfringementSuspect"}


def classify(resp: UpstreamResponse, message: str, *, code: Any = None, param: Any = None,
             kind: Any = None) -> GatewayError:
    """Map a provider's status and error code to the gateway's error: refusals and bad requests are the client's,
    key rejections, rate limits and server errors are the channel's."""
    status = resp.status
    refused = code in REFUSAL_CODES or str(code).endswith("SensitiveContentDetected")
    if refused or kind == "image_generation_user_error":
        return ContentPolicyViolation(message, param=param if isinstance(param, str) and param else None)
    if status in (401, 403):
        return key_rejected(resp, message, names_key=code in KEY_CODES or kind in KEY_CODES)
    if status == 429:
        return rate_limited(resp, retry_after(resp))
    if status == 408 or status >= 500:
        return UpstreamError(f"The provider failed (HTTP {status}).", channel_fault=True)
    if status in (400, 413, 415, 422):
        return InvalidRequest(message, param=param if isinstance(param, str) and param else None,
                              code=code if isinstance(code, str) else None)
    return UpstreamError(f"The provider answered HTTP {status}.", channel_fault=True)


def key_rejected(resp: UpstreamResponse, message: str, *, names_key: bool) -> UpstreamKeyRejected:
    return UpstreamKeyRejected(f"The provider rejected the channel's credentials (HTTP {resp.status}): {message}",
                               channel_fault=True, names_key=names_key, provider_message=message)


def rate_limited(resp: UpstreamResponse, after: int | None) -> RateLimited:
    return RateLimited(f"The provider is rate limiting this channel (HTTP {resp.status}).", channel_fault=True,
                       retry_after=after)
