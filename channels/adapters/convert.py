"""Translations several adapters share: sizes to aspect ratios, images to data URLs, OpenAI masks to white-repaint
masks. Pure functions."""

from __future__ import annotations

import base64
import io
import math

from PIL import Image

from openopen8.core.schemas import ImageInput


def dimensions(size: str | None) -> tuple[int, int] | None:
    """``(width, height)`` for a ``WxH`` size; ``None`` for ``auto``, no size or anything else."""
    width, _, height = (size or "").partition("x")
    if width.isdecimal() and height.isdecimal() and int(width) and int(height):
        return int(width), int(height)
    return None


def nearest_ratio(size: str | None, ratios: list[str]) -> str | None:
    """The supported ``W:H`` ratio closest to ``size`` (by log distance); ``None`` when the size says nothing."""
    wh = dimensions(size)
    if wh is None:
        return None
    target = math.log(wh[0] / wh[1])

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(float(w) / float(h)) - target)

    return min(ratios, key=distance)


def data_url(image: ImageInput) -> str:
    return f"data:{image.content_type};base64,{base64.b64encode(image.read()).decode()}"


def repaint_mask(openai_mask: bytes, *, repaint_white: bool = True) -> bytes:
    """OpenAI's mask (transparent = repaint, whatever the colour) as a grayscale PNG where white = repaint and black
    = keep, or the reverse."""
    with Image.open(io.BytesIO(openai_mask)) as mask:
        alpha = mask.convert("RGBA").getchannel("A")
    repaint, keep = (255, 0) if repaint_white else (0, 255)
    out = io.BytesIO()
    alpha.point(lambda a: repaint if a == 0 else keep).save(out, "PNG")
    return out.getvalue()


def with_mask_as_alpha(image: ImageInput, mask: ImageInput | None) -> bytes:
    """The image as a PNG whose alpha is the mask's (transparent = repaint), for providers that read the alpha."""
    with Image.open(io.BytesIO(image.read())) as source:
        merged = source.convert("RGBA")
    if mask is not None:
        with Image.open(io.BytesIO(mask.read())) as m:
            merged.putalpha(m.convert("RGBA").getchannel("A"))
    out = io.BytesIO()
    merged.save(out, "PNG")
    return out.getvalue()
