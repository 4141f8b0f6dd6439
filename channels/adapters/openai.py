"""Any OpenAI-compatible images API: Bearer key, the client's fields passed through, model name mapped."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from channels.adapters.base import Adapter, ChannelTarget, only_keys
from openopen8.core.errors import UpstreamError
from openopen8.core.http import UploadPart, UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import RESPONSE_PASSTHROUGH, ImageData, ImageRequest, ImagesResponse, JSONDict

RESPONSE_FORMATS = ("url", "b64_json")


@dataclass(frozen=True)
class Config:
    # The format asked of the provider, in place of the client's, for models that take one.
    response_format: str | None = None


def form_value(value: object) -> str:
    """A field's text in a multipart form: JSON for booleans, objects and lists, as OpenAI's SDK sends them."""
    return value if isinstance(value, str) else json.dumps(value)


def malformed(why: str) -> UpstreamError:
    return UpstreamError(f"The provider sent a malformed answer ({why}).", channel_fault=True)


class OpenAICompatibleAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"response_format"})
    streams = True

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, OpenAICompatibleAdapter.config_keys)
        fmt = raw.get("response_format")
        if fmt is not None and fmt not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
        return Config(response_format=fmt)

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        body = {**req.fields, "model": target.provider_model(req.model)}
        if target.config.response_format and "response_format" in body:
            body["response_format"] = target.config.response_format
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        url = f"{target.base_url.rstrip('/')}/images/{req.endpoint}"
        if req.endpoint == "generations":
            return UpstreamRequest("POST", url, headers, json=body)
        # Edits and variations go as multipart with OpenAI's field names, whichever form the client used.
        name = "image" if len(req.images) == 1 else "image[]"
        files = [UploadPart(name, i.filename, i.file, i.content_type) for i in req.images]
        files += [UploadPart(field, f.filename, f.file, f.content_type)
                  for field, f in (("mask", req.mask), ("markup", req.markup)) if f is not None]
        form = {key: form_value(value) for key, value in body.items()}
        return UpstreamRequest("POST", url, headers, form=form, files=tuple(files))

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/models", headers)

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        return images_from_body(resp.json())


def images_from_body(body: Any) -> ImagesResponse:
    """OpenAI's response shape read from a provider's JSON. Raises ``UpstreamError`` (channel fault) if malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise malformed("no data list")
    images = []
    for item in body["data"]:
        if not isinstance(item, dict) or not any(isinstance(item.get(k), str) for k in ("b64_json", "url")):
            raise malformed("an image with neither url nor b64_json")
        revised = item.get("revised_prompt")
        images.append(ImageData(b64_json=item.get("b64_json"), url=item.get("url"),
                                revised_prompt=revised if isinstance(revised, str) else None))
    created = body.get("created")
    return ImagesResponse(created=created if isinstance(created, int) else int(time.time()), data=images,
                          extra={k: body[k] for k in RESPONSE_PASSTHROUGH if k in body})
