"""The one error type, with OpenAI's error vocabulary.

In app code, just raise a ``GatewayError`` subclass::

    raise InvalidRequest("n must be between 1 and 10.", param="n")

``gateway/exception_handlers.py`` renders it (and DRF's own exceptions, and anything unexpected) as
``{"error": {"message", "type", "param", "code"}}`` with the class's status.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        channel_fault: bool = False,
        ambiguous: bool = False,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # channel_fault: the channel failed, not the request, so another channel may be tried.
        # ambiguous: the request was sent and the answer lost (read timeout, dropped or cut-off answer): the provider
        # may have made and billed the image, so it is retried only on channels marked safe to retry.
        self.channel_fault = channel_fault
        self.ambiguous = ambiguous
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.ambiguous:  # the provider may have made (and billed) the image: the SDKs must not repeat it blindly
            headers["x-should-retry"] = "false"
        return headers


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class NotAcceptable(GatewayError):
    status = 406
    type = "invalid_request_error"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class InsufficientQuota(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    budget_of = "token"  # whose budget refused: the token's or its "group"'s


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamKeyRejected(UpstreamError):
    """The provider answered 401/403. ``names_key``: its code says the key itself is bad (set aside at once);
    otherwise the refusal may be the request's (a model refused to an unverified organisation), and the key is set
    aside only once a probe of it fails too, or the rejections repeat."""

    def __init__(self, message: str, *, names_key: bool, provider_message: str = "", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.names_key = names_key
        self.provider_message = provider_message


class UpstreamRefused(GatewayError):
    """The provider refused this request (401/403) though the channel's key works: the client's answer."""

    status = 403
    type = "invalid_request_error"
    code = "upstream_permission_denied"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def database_unavailable() -> ServiceUnavailable:
    """A request that could not reach the gateway's database: temporary, so 503 with a time to come back."""
    return ServiceUnavailable("The gateway cannot reach its database right now; try again shortly.",
                              code="database_unavailable", retry_after=5)


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


NO_API_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
              "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")

SECRET_PATTERNS = [
    re.compile(r"\b(?:sk|pk|rk|key|api[-_]?key)[-_][A-Za-z0-9_\-]{8,}", re.IGNORECASE),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]{8,}"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^/\s@]+@"),
]


def secret_forms(*secrets: str) -> set[str]:
    """Every form in which a secret the gateway sent may come back from a provider: as is, the password of a
    ``user:password`` pair, the token after an auth scheme, base64 (how HTTP Basic sends a pair; standard, URL-safe,
    unpadded), the pair a Basic header's base64 decodes to, and percent-encoded."""
    plain: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        plain.add(secret)
        scheme, _, token = secret.partition(" ")
        if token and scheme.lower() in ("bearer", "basic", "token"):
            plain.add(token)
            if scheme.lower() == "basic":
                try:
                    plain.add(base64.b64decode(token, validate=True).decode())
                except ValueError:
                    pass
    plain.update([p.split(":", 1)[1] for p in plain if ":" in p])  # the password of a pair; the user name is no secret
    forms = set(plain)
    for value in plain:
        raw = value.encode()
        for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
            forms.update((encoded, encoded.rstrip("=")))
        forms.add(quote(value, safe=""))
    return {form for form in forms if len(form) >= 4}


def mask_secrets(text: str, *secrets: str) -> str:
    """Remove the given secrets (in every form ``secret_forms`` knows), key-shaped tokens and URL credentials from a
    provider's text."""
    for form in sorted(secret_forms(*secrets), key=len, reverse=True):
        text = text.replace(form, "***")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + "***", text)
    return text


SAFE_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
SAFE_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]\-]{0,63}")


def mask_error(error: GatewayError, *secrets: str) -> GatewayError:
    """Mask a provider-made error before it reaches a client, a usage row, a log or a metric: the message of the
    secrets, and a ``code`` or ``param`` that is not a plain identifier (or that held a secret) is dropped."""
    error.message = mask_secrets(error.message, *secrets)
    if isinstance(error, UpstreamKeyRejected):
        error.provider_message = mask_secrets(error.provider_message, *secrets)
    for name, shape in (("code", SAFE_CODE), ("param", SAFE_PARAM)):
        value = getattr(error, name)
        if value is not None and (not isinstance(value, str) or not shape.fullmatch(value)
                                  or mask_secrets(value, *secrets) != value):
            setattr(error, name, None)
    return error
