"""Plain values for adapter tests that need no database and no server: a target, a checked request, an answer."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

from PIL import Image

from channels.adapters import ChannelTarget, get_adapter
from openopen8.core.http import UpstreamResponse
from openopen8.core.rules import check_request
from openopen8.core.schemas import ImageInput, ImageRequest

KEY = "sk-provider-key-0001"


def target(kind: str, *, base_url: str = "https://provider.example/v1", api_key: str = KEY,
           config: dict[str, Any] | None = None, model_map: dict[str, str] | None = None) -> ChannelTarget:
    """A channel as adapters see it, its config parsed by the adapter as the admin would."""
    adapter = get_adapter(kind)
    return ChannelTarget(id=1, name=f"{kind} channel", kind=kind, base_url=base_url, api_key=api_key,
                         config=adapter.parse_config(config or {}), model_map=model_map or {})


def request(endpoint: str = "generations", *, images: tuple[ImageInput, ...] = (), mask: ImageInput | None = None,
            **fields: Any) -> ImageRequest:
    """A request as the gateway's checks leave it."""
    return replace(check_request({"prompt": "a red fox", **fields}, endpoint=endpoint), images=images, mask=mask)


def png_input(width: int = 64, height: int = 48, *, alpha: bool = False) -> ImageInput:
    buffer = io.BytesIO()
    Image.new("RGBA" if alpha else "RGB", (width, height)).save(buffer, "PNG")
    size = buffer.tell()
    return ImageInput(buffer, "in.png", "png", width, height, size, alpha)


def answer(status: int, body: Any, *, headers: dict[str, str] | None = None, url: str = "") -> UpstreamResponse:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return UpstreamResponse(status, headers or {}, content, 0, url)
