"""The one error type, and the handler that renders every failure as OpenAI's error JSON.

In app code, just raise a ``GatewayError`` subclass::

    raise InvalidRequest("n must be between 1 and 10.", param="n")

The handler turns it (and DRF's own exceptions, and anything unexpected) into
``{"error": {"message", "type", "param", "code"}}`` with the right status.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response

log = logging.getLogger(__name__)


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
        retryable: bool = False,
        channel_fault: bool = False,
        ambiguous: bool = False,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # retryable: another channel may be tried, the provider cannot have made a billable image.
        # ambiguous: the request was sent and the answer lost (read timeout, dropped or cut-off answer): the provider
        # may have made and billed the image, so it is retried only on channels marked safe to retry.
        self.retryable = retryable
        self.channel_fault = channel_fault
        self.ambiguous = ambiguous
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


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


class ModelNotFound(NotFound):
    code = "model_not_found"


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


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamKeyRejected(UpstreamError):
    """The provider refused the channel's key (401/403): that key is set aside until an operator restores it."""


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


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


def mask_secrets(text: str, *secrets: str) -> str:
    """Remove the given secrets, key-shaped tokens and URL credentials from a provider's message."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + "***", text)
    return text


def error_response(error: GatewayError) -> JsonResponse:
    return JsonResponse(error.to_body(), status=error.status, headers=error.headers())


def _first_detail(detail: Any, prefix: str = "") -> tuple[str | None, str]:
    """The first (field, message) in a DRF ValidationError detail, like healthchecks' format_first_error."""
    if isinstance(detail, dict):
        for field, value in detail.items():
            name = field if field != "non_field_errors" else None
            param, message = _first_detail(value, f"{prefix}{field}." if name else prefix)
            return param or (f"{prefix}{field}" if name else None), message
    if isinstance(detail, list) and detail:
        return _first_detail(detail[0], prefix)
    return None, str(detail)


def from_drf(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, drf.ValidationError):
        param, message = _first_detail(exc.detail)
        return InvalidRequest(f"Invalid '{param}': {message}" if param else message, param=param)
    if isinstance(exc, drf.NotAuthenticated):
        return AuthenticationError(NO_API_KEY)
    if isinstance(exc, drf.AuthenticationFailed):
        return AuthenticationError(str(exc.detail))
    if isinstance(exc, drf.Throttled):
        return RateLimited("Rate limit reached; try again later.", retry_after=int(getattr(exc, "wait", None) or 1))
    if isinstance(exc, (Http404, drf.NotFound)):
        return NotFound("Not found.")
    if isinstance(exc, drf.ParseError):
        return InvalidRequest("We could not parse the JSON body of your request. The OpenAI API expects a JSON "
                              "payload; check that it is valid JSON and that Content-Type is application/json.")
    if isinstance(exc, drf.APIException):
        error = InvalidRequest(str(exc.detail), code=getattr(exc, "default_code", None))
        error.status = exc.status_code
        return error
    return GatewayError("The server had an error while processing your request. Please retry your request.")


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception becomes OpenAI's error body, never HTML or a traceback."""
    error = from_drf(exc)
    if error.status >= 500 and not isinstance(exc, GatewayError):
        log.exception("unhandled error", exc_info=exc)
    headers = error.headers()
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
    return Response(error.to_body(), status=error.status, headers=headers)


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    # Django answers here for requests it refuses before any view, such as an unknown Host header.
    return error_response(InvalidRequest("Bad request."))


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(PermissionDenied("Forbidden.", code="forbidden"))


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(NotFound(f"Invalid URL ({request.method} {request.path})"))


def handler500(request: HttpRequest) -> JsonResponse:
    return error_response(GatewayError("The server had an error while processing your request."))
