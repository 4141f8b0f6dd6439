"""The handlers that render every failure as OpenAI's error JSON: DRF's ``EXCEPTION_HANDLER`` and Django's
``handler400``/``403``/``404``/``500``. App code raises a ``GatewayError``; only this module builds error answers."""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponseBase, JsonResponse
from django.views.csrf import csrf_failure as django_csrf_failure
from django.views.defaults import page_not_found as django_page_not_found
from rest_framework import exceptions as drf
from rest_framework.response import Response

from openopen8.core.errors import (
    NO_API_KEY,
    AuthenticationError,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    UnsupportedMediaType,
    database_unavailable,
)

log = logging.getLogger(__name__)

# DRF's other exceptions, by their status: the gateway's class for each.
_BY_STATUS: dict[int, type[GatewayError]] = {400: InvalidRequest, 403: PermissionDenied, 404: NotFound,
                                             405: MethodNotAllowed, 406: NotAcceptable, 415: UnsupportedMediaType}


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
    if isinstance(exc, RequestDataTooBig):
        return RequestTooLarge(f"The request body is larger than this gateway accepts "
                               f"({settings.OPENOPEN8_MAX_REQUEST_BYTES} bytes).")
    if isinstance(exc, TooManyFieldsSent):
        return InvalidRequest(f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} form fields.")
    if isinstance(exc, TooManyFilesSent):
        return InvalidRequest(f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FILES} files.")
    if isinstance(exc, drf.ParseError):
        if str(exc.detail).startswith("Multipart form parse error"):
            return InvalidRequest("We could not parse the multipart body of your request; check that it is "
                                  "multipart/form-data with the boundary its Content-Type names.")
        return InvalidRequest("We could not parse the JSON body of your request. The OpenAI API expects a JSON "
                              "payload; check that it is valid JSON and that Content-Type is application/json.")
    if isinstance(exc, (OperationalError, InterfaceError)):  # the database is away, or too busy to answer in time
        return database_unavailable()
    if isinstance(exc, drf.APIException):
        return _BY_STATUS.get(exc.status_code, GatewayError)(str(exc.detail), code=getattr(exc, "default_code", None))
    return GatewayError("The server had an error while processing your request. Please retry your request.")


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception becomes OpenAI's error body, never HTML or a traceback."""
    error = from_drf(exc)
    if isinstance(exc, (OperationalError, InterfaceError)):
        log.warning("database unreachable: %s", type(exc).__name__)  # a line, not a traceback, per request
    elif error.status >= 500 and not isinstance(exc, GatewayError):
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


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponseBase:
    """Django's CSRF refusal: the console's own page for the admin, OpenAI's JSON anywhere else."""
    if request.path_info.startswith("/admin/"):
        return django_csrf_failure(request, reason)
    return error_response(PermissionDenied("Forbidden.", code="forbidden"))


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponseBase:
    """OpenAI's JSON, but for the console's own pages, which get the console's 404 page."""
    if request.path_info.startswith("/admin/"):
        return django_page_not_found(request, exception or Http404())
    return error_response(NotFound(f"Invalid URL ({request.method} {request.path})"))


def handler500(request: HttpRequest) -> JsonResponse:
    if isinstance(sys.exc_info()[1], (OperationalError, InterfaceError)):  # raised outside a view, by middleware
        return error_response(database_unavailable())
    return error_response(GatewayError("The server had an error while processing your request."))
