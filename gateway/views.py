"""Thin HTTP views: authenticate, hand the body to a service, render the result."""

from __future__ import annotations

import uuid
from typing import cast

from django.conf import settings
from django.http import FileResponse, HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.http import require_GET
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.errors import NotFound, error_response
from gateway.hosting import image_open
from gateway.models import ApiToken
from gateway.services import image_generate


def files_url(request: HttpRequest) -> str:
    """Base of hosted image URLs: OPENOPEN8_PUBLIC_URL, or the scheme and host the client used."""
    path = reverse("image-file", args=["x"])[:-1]
    base = settings.OPENOPEN8_PUBLIC_URL or f"{request.scheme}://{request.get_host()}"
    return f"{base}{path}"


class ImageGenerationApi(APIView):
    def post(self, request: Request) -> Response:
        request_id = f"req_{uuid.uuid4().hex}"
        token = cast(ApiToken, request.auth)  # HasApiToken lets no request through without one
        result = image_generate(token=token, body=request.data, endpoint="generations",
                                request_id=request_id, files_url=files_url(request))
        return Response(result, headers={"x-request-id": request_id})


@require_GET
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


def unknown_api_path(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any other /v1/ path: OpenAI's 404 body, in debug mode too."""
    return error_response(NotFound(f"Invalid URL ({request.method} {request.path})"))
