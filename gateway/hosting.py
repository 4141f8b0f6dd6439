"""Hosted images: the provider's image stored under an unguessable, expiring name and served by the gateway, or
encoded as base64; whichever the client asked for, whatever the provider returned.

The expiry time is part of the file name (hex seconds), so serving and purging need no database.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import time
from typing import IO

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages

from openopen8.core import http
from openopen8.core.errors import NotFound, UpstreamError
from openopen8.core.schemas import ImageData, ImagesResponse

FILE_NAME = re.compile(r"^(?P<expires>[0-9a-f]{8,12})-[A-Za-z0-9_-]{32}\.(?P<ext>png|jpg|webp|gif|svg)$")
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
                 "svg": "image/svg+xml"}


def sniff(data: bytes) -> str:
    """The file extension for image bytes, by their signature. Raises ``UpstreamError`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if b"<svg" in data[:1024].lower():
        return "svg"
    raise UpstreamError("The provider returned something that is not an image.", channel_fault=True)


def image_store(data: bytes, *, ttl: int) -> str:
    """Store image bytes; return the file name under which they are served until ``ttl`` seconds from now."""
    name = f"{int(time.time()) + ttl:x}-{secrets.token_urlsafe(24)}.{sniff(data)}"
    return str(storages["images"].save(name, ContentFile(data)))


def image_open(name: str) -> tuple[IO[bytes], str, int]:
    """An open hosted file, its content type and seconds left. Raises ``NotFound`` if unknown or expired."""
    match = FILE_NAME.match(name)
    left = int(match["expires"], 16) - int(time.time()) if match else 0
    storage = storages["images"]
    if not match or left <= 0 or not storage.exists(name):
        raise NotFound("This image does not exist or its URL has expired.")
    return storage.open(name, "rb"), CONTENT_TYPES[match["ext"]], left


def images_purge(*, now: float | None = None) -> int:
    """Delete expired hosted images (and stray files that are not hosted images); return how many were deleted."""
    storage, now = storages["images"], now if now is not None else time.time()
    deleted = 0
    for name in storage.listdir("")[1]:
        match = FILE_NAME.match(name)
        if match is None or int(match["expires"], 16) <= now:
            storage.delete(name)
            deleted += 1
    return deleted


def _download(url: str, *, timeout: float, trusted: str) -> bytes:
    buffer = io.BytesIO()
    own_host = bool(trusted) and url.startswith(trusted.rstrip("/") + "/")
    http.fetch(url, timeout=timeout, max_bytes=settings.OPENOPEN8_MAX_IMAGE_BYTES, into=buffer, guarded=not own_host)
    return buffer.getvalue()


def _decode(b64: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamError("The provider sent an image that is not valid base64.", channel_fault=True) from None


def images_deliver(result: ImagesResponse, *, response_format: str, files_url: str, ttl: int, timeout: float,
                   trusted: str = "") -> ImagesResponse:
    """The client's answer: every image as a gateway URL (``url``) or as base64 (``b64_json``).

    Provider URLs are downloaded (with a timeout and size cap; on private addresses only under ``trusted``, the
    channel's own base URL, or where the operator allows it) and never shown to the client. Raises
    ``UpstreamError``/``UpstreamTimeout`` (channel faults) when an image cannot be had.
    """
    delivered = []
    for image in result.data:
        if response_format == "b64_json":
            b64 = image.b64_json
            if b64 is None:
                b64 = base64.b64encode(_download(str(image.url), timeout=timeout, trusted=trusted)).decode()
            delivered.append(ImageData(b64_json=b64, revised_prompt=image.revised_prompt))
        else:
            if image.b64_json is not None:
                data = _decode(image.b64_json)
            else:
                data = _download(str(image.url), timeout=timeout, trusted=trusted)
            name = image_store(data, ttl=ttl)
            delivered.append(ImageData(url=f"{files_url}{name}", revised_prompt=image.revised_prompt))
    return ImagesResponse(created=result.created, data=delivered, extra=result.extra)
