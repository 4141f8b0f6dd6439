"""Placeholder images for demos and client integration tests: no provider, no network, no cost.

Each image is a PNG of the requested size that shows the prompt and says plainly that it is a placeholder.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import textwrap
import time
from typing import ClassVar

from PIL import Image, ImageDraw, ImageFont

from channels.adapters.base import ChannelTarget
from channels.adapters.openai import Config, OpenAICompatibleAdapter
from channels.adapters.sd_webui import parse_size
from openopen8.core.errors import InvalidRequest
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageRequest, JSONDict

MAX_SIDE = 4096
LABEL = "OpenOpen8 placeholder - not a generated image"


def render_png(prompt: str, width: int, height: int, index: int, count: int) -> bytes:
    digest = hashlib.sha256(prompt.encode()).digest()
    background = tuple(64 + b // 2 for b in digest[:3])
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    scale = max(10, min(width, height) // 24)
    font, small = ImageFont.load_default(size=scale), ImageFont.load_default(size=max(8, scale * 2 // 3))
    draw.rectangle((0, 0, width, scale * 2), fill=(20, 20, 20))
    draw.text((scale // 2, scale // 2), LABEL, fill=(255, 210, 0), font=small)
    columns = max(8, int(width / (scale * 0.55)))
    lines = textwrap.wrap(prompt, columns)[: max(1, (height - scale * 5) // int(scale * 1.3))]
    for row, line in enumerate(lines):
        draw.text((scale // 2, scale * 3 + row * int(scale * 1.3)), line, fill=(255, 255, 255), font=font)
    footer = f"{index + 1}/{count}  {width}x{height}"
    draw.text((scale // 2, height - scale * 2), footer, fill=(230, 230, 230), font=small)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def render(req: UpstreamRequest, *, timeout: float, connect_timeout: float | None = None) -> UpstreamResponse:
    """Stands in for the network: answers like an OpenAI provider with base64 PNGs."""
    started = time.monotonic()
    body = req.json or {}
    width, height = body["width"], body["height"]
    data = [{"b64_json": base64.b64encode(render_png(body["prompt"], width, height, i, body["n"])).decode()}
            for i in range(body["n"])]
    content = json.dumps({"created": int(time.time()), "data": data}).encode()
    latency_ms = int((time.monotonic() - started) * 1000)
    return UpstreamResponse(200, {"content-type": "application/json"}, content, latency_ms)


class PlaceholderAdapter(OpenAICompatibleAdapter):
    streams = False
    config_keys: ClassVar[frozenset[str]] = frozenset()
    needs_base_url: ClassVar[bool] = False
    transport = staticmethod(render)

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        if raw:
            raise ValueError(f"the placeholder takes no config, got keys: {', '.join(sorted(raw))}")
        return Config()

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return None

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        if req.size and req.size != "auto":
            width, height = parse_size(req.size)
        elif req.images:  # an edit or variation comes out the size of its (first) input
            width, height = min(req.images[0].width, MAX_SIDE), min(req.images[0].height, MAX_SIDE)
        else:
            width, height = 1024, 1024
        if max(width, height) > MAX_SIDE:
            raise InvalidRequest(f"The placeholder renders at most {MAX_SIDE} px a side.", param="size")
        text = req.prompt or f"variation of a {req.images[0].width}x{req.images[0].height} image"
        if req.endpoint == "edits":
            text = f"edit of a {req.images[0].width}x{req.images[0].height} image: {text}"
        return UpstreamRequest("POST", "placeholder:", json={"prompt": text, "n": req.n, "width": width,
                                                             "height": height})
