"""OpenAI's image wire shapes as frozen values: what a client asked for and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

JSONDict = dict[str, Any]

# Top-level fields of a provider's answer that the client gets back as they are.
RESPONSE_PASSTHROUGH = ("usage", "size", "quality", "output_format", "background", "svg_usage", "safety_identifier")


@dataclass(frozen=True)
class ImageInput:
    """An input image that was checked by decoding it. ``file`` is a seekable local file (a temporary file past a
    small size), never a network stream."""

    file: IO[bytes]
    filename: str
    format: str
    width: int
    height: int
    size: int
    has_alpha: bool

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


@dataclass(frozen=True)
class ImageRequest:
    """A checked client request. ``fields`` is what the client sent (unknown fields included), ready to forward;
    the typed attributes are the resolved values the gateway itself uses."""

    endpoint: str
    model: str
    prompt: str
    n: int
    size: str | None
    quality: str | None
    response_format: str
    fields: JSONDict = field(default_factory=dict)
    # What the model accepts as input images on this endpoint (edits, variations): count, formats, bytes, shape.
    input_rule: JSONDict | None = None
    images: tuple[ImageInput, ...] = ()
    mask: ImageInput | None = None
    markup: ImageInput | None = None
    stream: bool = False  # answer as server-sent events (gateway/streaming.py)


@dataclass(frozen=True)
class ImageData:
    """One image as a provider returned it: base64 text or a URL of the provider's."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True)
class ImagesResponse:
    created: int
    data: list[ImageData]
    extra: JSONDict = field(default_factory=dict)

    def to_dict(self) -> JSONDict:
        items = []
        for image in self.data:
            item: JSONDict = {"url": image.url} if image.url is not None else {"b64_json": image.b64_json}
            if image.revised_prompt is not None:
                item["revised_prompt"] = image.revised_prompt
            items.append(item)
        return {"created": self.created, "data": items, **self.extra}
