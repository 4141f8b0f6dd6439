"""Thin HTTP views: authenticate, hand the body to a service, render the result."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Callable, Iterable
from functools import cache, wraps
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    QueryDict,
    StreamingHttpResponse,
)
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.auth import ApiAccess
from gateway.balance import subscription, usage
from gateway.exception_handlers import error_response
from gateway.hosting import image_open
from gateway.idempotency import Replay
from gateway.jobs import job_object, job_of, jobs_of, jobs_page
from gateway.metrics import metrics_text
from gateway.parsers import StrictJSONParser
from gateway.selectors import served_model_names
from gateway.services import images_create, job_cancel
from gateway.state import shared_state
from gateway.streaming import StreamAnswer, stream_replayed
from openopen8.client import ClientConnection
from openopen8.core.errors import AuthenticationError, InvalidRequest, MethodNotAllowed, NotFound, RequestTooLarge
from openopen8.core.rules import from_form
from openopen8.readiness import database_status

View = Callable[..., HttpResponseBase]


@cache
def _files_path() -> str:
    return reverse("image-file", args=["x"])[:-1]


def files_url(request: HttpRequest) -> str:
    """Base of hosted image URLs: OPENOPEN8_PUBLIC_URL, or the scheme and host the client used."""
    base = settings.OPENOPEN8_PUBLIC_URL or f"{request.scheme}://{request.get_host()}"
    return f"{base}{_files_path()}"


def _forget_renderer_context(response: Response) -> None:
    # DRF set this in finalize_response and put the response itself in it while rendering.
    response.renderer_context = {}  # type: ignore[attr-defined]


class JsonAnswers(DefaultContentNegotiation):
    """Answer JSON whatever the Accept header or a ``?format=`` says, as OpenAI's API does; DRF's negotiation refused
    ``Accept: text/html`` with 406 and ``?format=xml`` with 404, and cost time on every request (bench/RESULTS.md)."""

    def select_renderer(self, request: Request, renderers: Iterable[BaseRenderer],
                        format_suffix: str | None = None) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class GatewayApi(APIView):
    """Every answer, errors included, carries ``x-request-id``: the id of the request's usage row. Bodies over
    OPENOPEN8_MAX_REQUEST_BYTES are refused with 413 before they are read."""

    content_negotiation_class = JsonAnswers
    request_id = ""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        self.request_id = f"req_{uuid.uuid4().hex}"
        response = super().dispatch(request, *args, **kwargs)
        response["x-request-id"] = self.request_id
        # DRF leaves the answer in two reference cycles (view -> response, the view being in one with its request;
        # response -> renderer context -> response), so every answer, megabytes of base64 parsed and rendered, lived
        # until the next cyclic garbage collection (bench/RESULTS.md). Cutting both edges frees the answer as soon as
        # the server has sent it.
        del self.response
        if isinstance(response, Response):
            response.add_post_render_callback(_forget_renderer_context)
        return response

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        length = request.META.get("CONTENT_LENGTH") or "0"
        cap = settings.OPENOPEN8_MAX_REQUEST_BYTES
        if length.isdecimal() and int(length) > cap:
            raise RequestTooLarge(f"The request body is {int(length)} bytes; this gateway accepts at most {cap}.")


class ImagesApi(GatewayApi):
    endpoint: str  # generations, edits or variations, set by each subclass

    def post(self, request: Request) -> HttpResponseBase:
        access = cast(ApiAccess, request.auth)  # HasApiToken lets no request through without one

        def read() -> tuple[Any, Any]:
            body: Any = request.data
            if not request.content_type.startswith("multipart/"):
                return body, None
            # Text fields only (the last value of a repeated one), typed as JSON would be.
            return from_form({k: v for k, v in cast(QueryDict, body).items() if k not in request.FILES}), request.FILES

        result = images_create(token=access.token, config=access.config, endpoint=self.endpoint, read=read,
                               request_id=self.request_id, files_url=files_url(request),
                               client=ClientConnection(request.META),
                               idempotency=request.META.get("HTTP_IDEMPOTENCY_KEY"),
                               asynchronous=prefers_async(request.META.get("HTTP_PREFER", "")))
        if isinstance(result, Replay):  # a job submitted, or the first answer to this Idempotency-Key again
            self.request_id = result.request_id
            if result.status == 202:
                return _job_accepted(result.answer)
            if result.stream is not None:
                return _event_stream(stream_replayed(result.stream, json.loads(result.answer)))
            return HttpResponse(result.answer, status=result.status, content_type="application/json")
        if not isinstance(result, StreamAnswer):
            return Response(result)
        error = result.first_error(settings.OPENOPEN8_STREAM_KEEPALIVE)
        if error is not None:  # nothing streamed yet: the client gets the error as any request would
            raise error
        return _event_stream(result)


def _event_stream(frames: Iterable[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(frames, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx and its kind pass each event on at once
    return response


class ImageGenerationApi(ImagesApi):
    endpoint = "generations"


class ImageEditApi(ImagesApi):
    """Multipart (``image``/``image[]``, ``mask``) as the SDK sends it, or JSON with ``images: [{"image_url"}]``."""

    endpoint = "edits"
    parser_classes = [StrictJSONParser, MultiPartParser]


class ImageVariationApi(ImagesApi):
    endpoint = "variations"
    parser_classes = [MultiPartParser]


def _only(params: QueryDict, *names: str) -> QueryDict:
    """The query parameters, if they are among ``names``. Raises ``InvalidRequest`` naming the first other one."""
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise InvalidRequest(f"Unknown parameter '{unknown[0][:40]}': this endpoint takes {' and '.join(names)}.",
                             param=unknown[0][:40])
    return params


def prefers_async(prefer: str) -> bool:
    """Whether a ``Prefer`` header (RFC 7240: preferences split by commas, parameters after semicolons) asks for
    ``respond-async``."""
    return any(part.split(";")[0].split("=")[0].strip().lower() == "respond-async" for part in prefer.split(","))


def _job_accepted(job: str) -> HttpResponse:
    response = HttpResponse(job, status=202, content_type="application/json")
    response["Location"] = reverse("image-job", args=[json.loads(job)["id"]])
    response["Retry-After"] = "2"
    response["Preference-Applied"] = "respond-async"
    response["Cache-Control"] = "no-store"
    return response


class JobsApi(GatewayApi):
    """The calling key's image jobs, newest first: ``limit`` (1-100, 20) and the ``after`` cursor (a job id)."""

    def get(self, request: Request) -> Response:
        params = _only(request.query_params, "limit", "after")
        limit = params.get("limit", "20")
        if not limit.isdecimal() or not 1 <= int(limit) <= 100:
            raise InvalidRequest("'limit' must be a whole number from 1 to 100.", param="limit")
        jobs, more = jobs_of(cast(ApiAccess, request.auth).token, limit=int(limit), after=params.get("after"))
        return Response(jobs_page(jobs, more), headers={"Cache-Control": "no-store"})


class JobApi(GatewayApi):
    def get(self, request: Request, job_id: str) -> Response:
        job = job_object(job_of(cast(ApiAccess, request.auth).token, job_id))
        return Response(job, headers={"Cache-Control": "no-store"})


class JobCancelApi(GatewayApi):
    def post(self, request: Request, job_id: str) -> Response:
        return Response(job_cancel(cast(ApiAccess, request.auth).token, job_id), headers={"Cache-Control": "no-store"})


class ModelListApi(GatewayApi):
    """The models this key can use: those some enabled channel serves by name, within the key's allowed list."""

    def get(self, request: Request) -> Response:
        access = cast(ApiAccess, request.auth)
        names = sorted(name for name in served_model_names(access.config) if name != "*" and access.token.allows(name))
        return Response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "openopen8"} for name in names]})


class BillingSubscriptionApi(GatewayApi):
    """The calling key's limit, as OpenAI's legacy billing API gave it."""

    def get(self, request: Request) -> Response:
        return Response(subscription(cast(ApiAccess, request.auth).token))


class BillingUsageApi(GatewayApi):
    """What the calling key spent between two dates, as OpenAI's legacy billing API gave it."""

    def get(self, request: Request) -> Response:
        params = _only(request.query_params, "start_date", "end_date")
        return Response(usage(cast(ApiAccess, request.auth).token, start_date=params.get("start_date"),
                              end_date=params.get("end_date"), today=timezone.now().date()))


def json_only(*methods: str) -> Callable[[View], View]:
    """A plain view on the API surface: no CSRF check (nothing there uses a session; Django's check would answer
    a POST with its HTML page), and any other method than ``methods`` is OpenAI's JSON 405."""

    def wrap(view: View) -> View:
        @wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if methods and request.method not in methods:
                refused = error_response(MethodNotAllowed(f"Method {request.method} is not allowed for "
                                                          f"{request.path}; use "
                                                          f"{' or '.join(m for m in methods if m != 'HEAD')}."))
                refused["Allow"] = ", ".join(methods)
                return refused
            return view(request, *args, **kwargs)

        return cast(View, csrf_exempt(checked))

    return wrap


@json_only("GET", "HEAD")
def image_file(request: HttpRequest, name: str) -> FileResponse | JsonResponse:
    """A hosted image, with its content type, until its URL expires. The unguessable name is the credential."""
    try:
        file, content_type, seconds_left = image_open(name)
    except NotFound as error:
        return error_response(error)
    response = FileResponse(file, content_type=content_type)
    response["Cache-Control"] = f"private, max-age={seconds_left}"
    response["X-Content-Type-Options"] = "nosniff"
    # An SVG could carry script: never let it run in the gateway's origin.
    response["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    return response


@cache
def _openapi() -> bytes:
    return (Path(__file__).with_name("openapi.json")).read_bytes()


@json_only("GET", "HEAD")
def openapi_description(request: HttpRequest) -> HttpResponse:
    """The client API in OpenAPI 3.1 (gateway/openapi.json), for anyone: it names no key, channel or model."""
    return HttpResponse(_openapi(), content_type="application/json")


@json_only("GET", "HEAD")
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up."""
    return JsonResponse({"status": "ok"})


@json_only("GET", "HEAD")
def readyz(request: HttpRequest) -> JsonResponse:
    """The process can serve: the database answers, and Redis too when it is configured; each asked with a timeout
    under a second."""
    checks = {"database": database_status(), **shared_state().health()}
    ready = all(v == "ok" for v in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


@json_only("GET", "HEAD")
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics in the text format; behind OPENOPEN8_METRICS_TOKEN when it is set."""
    expected = settings.OPENOPEN8_METRICS_TOKEN
    if expected:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            return error_response(AuthenticationError("Incorrect or missing metrics token. Send it as "
                                                      "Authorization: Bearer <OPENOPEN8_METRICS_TOKEN>."))
    return HttpResponse(metrics_text(), content_type=CONTENT_TYPE_LATEST)


@json_only()
def unknown_api_path(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any other /v1/ path: OpenAI's 404 body, in debug mode too."""
    return error_response(NotFound(f"Invalid URL ({request.method} {request.path})"))
