"""Input images for edits and variations: collected from multipart parts or JSON image references, and checked by
their contents (``image_check``), never by file name or declared type.

Every file here is local and seekable: Django keeps uploads past a small threshold in temporary files, and images
fetched from URLs or decoded from data URLs go to anonymous temporary files (removed by the OS when closed, even if
the process dies). The caller owns their closing, through the ``ExitStack`` it passes in.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import IO, Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from PIL import Image

from gateway.image_check import check_png, off_the_loop
from openopen8.core import http
from openopen8.core.errors import GatewayError, InvalidRequest
from openopen8.core.schemas import ImageInput, ImageRequest, JSONDict

FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
FETCH_TIMEOUT = 30.0


@dataclass
class RawInputs:
    """Files as the client sent them, before any check: multipart parts, or JSON references (``{"image_url"}``)."""

    images: list[Any] = field(default_factory=list)
    mask: Any = None
    markup: Any = None
    param: str = "image"

    @property
    def count(self) -> int:
        return len(self.images) + (self.mask is not None) + (self.markup is not None)


def from_multipart(files: Any) -> RawInputs:
    """The files of a multipart request; ``image`` and the SDK's ``image[]`` are both accepted."""
    return RawInputs(images=[*files.getlist("image"), *files.getlist("image[]")], mask=files.get("mask"),
                     markup=files.get("markup"))


def from_json(body: JSONDict) -> RawInputs:
    """The image references of a JSON edit (``images: [{"image_url": ...}]``, ``mask: {...}``)."""
    images = body.get("images")
    if images is not None and not isinstance(images, list):
        raise InvalidRequest("'images' must be a list of {\"image_url\": ...} objects.", param="images")
    return RawInputs(images=list(images or []), mask=body.get("mask"), param="images")


def _spool(stack: ExitStack) -> IO[bytes]:
    return stack.enter_context(tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR))


def _open_ref(ref: Any, *, param: str, max_bytes: int, stack: ExitStack) -> tuple[IO[bytes], str]:
    """A local file for a JSON image reference: a base64 data URL decoded, or an http(s) URL fetched."""
    if not isinstance(ref, dict) or set(ref) != {"image_url"} or not isinstance(ref["image_url"], str):
        if isinstance(ref, dict) and "file_id" in ref:
            raise InvalidRequest("File ids are not supported by this gateway; send the image as image_url (a data "
                                 "URL or an http(s) URL).", param=param, code="unsupported_parameter")
        raise InvalidRequest('Each image must be an object with exactly one key, "image_url".', param=param)
    url, file = ref["image_url"], _spool(stack)
    match = DATA_URL.match(url)
    if match:
        try:
            file.write(base64.b64decode(url[match.end():], validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequest("The image data URL is not valid base64.", param=param) from None
        return file, "image"
    if not url.lower().startswith(("http://", "https://")):
        raise InvalidRequest("image_url must be a base64 data URL or an http(s) URL.", param=param)
    try:
        http.fetch(url, timeout=FETCH_TIMEOUT, max_bytes=max_bytes, into=file)
    except GatewayError as e:
        raise InvalidRequest(f"The image at image_url could not be used: {e.message}", param=param) from None
    return file, url.rsplit("/", 1)[-1][:100] or "image"


def inspect(file: IO[bytes], *, filename: str, param: str, formats: list[str], max_bytes: int,
            pixels_left: int) -> ImageInput:
    """Check an image and describe it. Raises ``InvalidRequest`` (with ``param``) for anything that is not a
    complete, uncorrupted image of an allowed format within the byte and pixel caps, or that would take the request
    past ``pixels_left``. Its pixels are not all held at once (``image_check``)."""
    size = file.seek(0, 2)
    if size > max_bytes:
        raise InvalidRequest(f"The {param} must be smaller than {max_bytes / 1024 / 1024:g} MB; got "
                             f"{size / 1024 / 1024:.1f} MB.", param=param)
    file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:  # the header only
                kind = FORMATS.get(image.format or "")
                if kind not in formats:
                    raise InvalidRequest(f"The {param} must be {' or '.join(f.upper() for f in formats)}; this file "
                                         f"is {image.format or 'not an image'}.", param=param)
                width, height = image.size
                if width * height > settings.OPENOPEN8_MAX_IMAGE_PIXELS:
                    raise InvalidRequest(f"The {param} is {width}x{height}, more than the "
                                         f"{settings.OPENOPEN8_MAX_IMAGE_PIXELS}-pixel limit.", param=param)
                if width * height > pixels_left:
                    raise InvalidRequest(f"The input images of this request come to more than the "
                                         f"{settings.OPENOPEN8_MAX_REQUEST_PIXELS}-pixel limit.", param=param)
                alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            alpha = off_the_loop(_whole, file, kind) or alpha
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"The {param} decodes to too many pixels.", param=param) from None
    except Exception:  # Pillow raises many kinds for malformed data; every one means "not a valid image"
        raise InvalidRequest(f"The {param} is not a valid image: it could not be decoded (corrupt or truncated).",
                             param=param) from None
    file.seek(0)
    return ImageInput(file=file, filename=filename, format=kind, width=width, height=height, size=size,
                      has_alpha=alpha)


def _whole(file: IO[bytes], kind: str) -> bool:
    """Raise unless the image decodes whole; whether a PNG's header or chunks say it has alpha."""
    if kind == "png":
        return check_png(file)[2]
    file.seek(0)
    with Image.open(file) as image:
        if kind == "jpeg":  # decoded at an eighth of its size: every block read, a sixty-fourth of the memory
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    return False


def attach_inputs(req: ImageRequest, raw: RawInputs, *, stack: ExitStack) -> ImageRequest:
    """The request with its input images checked against the model's rule and attached.

    Raises ``InvalidRequest`` naming ``image``/``images``, ``mask`` or ``markup``.
    """
    rule = req.input_rule or {}
    param = raw.param
    if not raw.images:
        raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    limit = rule.get("max_images", 16)
    if len(raw.images) > limit:
        raise InvalidRequest(f"Model '{req.model}' takes at most {limit} input image(s); got {len(raw.images)}.",
                             param=param)
    max_bytes = min(rule.get("max_bytes") or settings.OPENOPEN8_MAX_UPLOAD_BYTES, settings.OPENOPEN8_MAX_UPLOAD_BYTES)
    formats = rule.get("formats", ["png", "jpeg", "webp"])

    pixels_left = settings.OPENOPEN8_MAX_REQUEST_PIXELS

    def check(item: Any, name: str, allowed: list[str]) -> ImageInput:
        nonlocal pixels_left
        if isinstance(item, UploadedFile) and item.file is not None:
            file, filename = item.file, item.name or "image"
        else:
            file, filename = _open_ref(item, param=name, max_bytes=max_bytes, stack=stack)
        checked = inspect(file, filename=filename, param=name, formats=allowed, max_bytes=max_bytes,
                          pixels_left=pixels_left)
        pixels_left -= checked.width * checked.height
        return checked

    images = tuple(check(item, param, formats) for item in raw.images)
    if rule.get("square") and any(i.width != i.height for i in images):
        first = next(i for i in images if i.width != i.height)
        raise InvalidRequest(f"The {param} must be square; got {first.width}x{first.height}.", param=param)
    if raw.mask is not None and raw.markup is not None:
        raise InvalidRequest("Send either a mask or a markup image, not both.", param="markup")
    mask = check(raw.mask, "mask", ["png"]) if raw.mask is not None else None
    if mask is not None:
        if not mask.has_alpha:
            raise InvalidRequest("The mask must be a PNG with an alpha channel: transparent areas mark where to edit.",
                                 param="mask")
        if (mask.width, mask.height) != (images[0].width, images[0].height):
            raise InvalidRequest(f"The mask is {mask.width}x{mask.height} but the image is "
                                 f"{images[0].width}x{images[0].height}; they must match.", param="mask")
    markup = check(raw.markup, "markup", ["png"]) if raw.markup is not None else None
    fields = {k: v for k, v in req.fields.items() if k not in ("images", "mask")}
    return replace(req, fields=fields, images=images, mask=mask, markup=markup)
