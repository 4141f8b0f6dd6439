"""Volcengine Ark (ByteDance Seedream, SeedEdit): an OpenAI-like ``/images/generations`` with Ark's own fields.

The base URL ends in ``/api/v3``. Ark has no ``n`` (the gateway calls in parallel), takes reference images as data
URLs in ``image`` (edits, no mask), sizes as ``WxH`` or a tier (``1K``/``2K``/``4K``), and passes ``seed``,
``guidance_scale`` and its other fields through. ``watermark`` is always sent: the channel's, else the client's, else
false (Ark's own default is a visible mark). Its moderation codes are read as refusals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from channels.adapters.base import ChannelTarget, only_keys
from channels.adapters.convert import data_url, dimensions
from channels.adapters.openai import OpenAICompatibleAdapter, images_from_body
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageRequest, ImagesResponse, JSONDict

TIERS = ("1K", "2K", "4K")
OPENAI_ONLY = ("n", "quality", "style", "background", "moderation", "output_compression", "user", "input_fidelity")


@dataclass(frozen=True)
class Config:
    default_size: str = "2K"  # for size "auto" or none
    hd_size: str = "4K"  # for quality hd/high with no size
    watermark: bool | None = None  # None: the client's field (default false); true/false: always that
    response_format: str | None = "b64_json"


class ArkAdapter(OpenAICompatibleAdapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"default_size", "hd_size", "watermark", "response_format"})
    streams = False  # Ark streams events of its own shape; the gateway makes OpenAI's from its answer
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 14
    file_fields = frozenset({"image"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:  # type: ignore[override]
        only_keys(raw, ArkAdapter.config_keys)
        for key in ("default_size", "hd_size"):
            if key in raw and raw[key] not in TIERS and dimensions(raw[key]) is None:
                raise ValueError(f"{key} must be 1K, 2K, 4K or WIDTHxHEIGHT")
        if raw.get("watermark") not in (None, True, False):
            raise ValueError("watermark must be true or false")
        if raw.get("response_format") not in (None, "url", "b64_json"):
            raise ValueError("response_format must be url or b64_json")
        return Config(**raw)

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return 1

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        config: Config = target.config
        body = {k: v for k, v in req.fields.items() if k not in OPENAI_ONLY}
        body["model"] = target.provider_model(req.model)
        if dimensions(req.size) is None:
            body["size"] = config.hd_size if req.quality in ("hd", "high") else config.default_size
        body["response_format"] = config.response_format or req.response_format
        # Ark marks every image unless told not to; OpenAI's carry no mark. The channel's rule wins, then the client's.
        client_mark = req.fields.get("watermark")
        body["watermark"] = config.watermark if config.watermark is not None else (
            client_mark if isinstance(client_mark, bool) else False)
        if req.images:
            refs = [data_url(image) for image in req.images]
            body["image"] = refs[0] if len(refs) == 1 else refs
        headers = {"Authorization": f"Bearer {target.api_key}"}
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/images/generations", headers, json=body)

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/models",
                               {"Authorization": f"Bearer {target.api_key}"})

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            # In group mode a failed image arrives as {"error": {...}} among the others: deliver the rest.
            body["data"] = [item for item in body["data"] if not (isinstance(item, dict) and "error" in item)]
            body.setdefault("created", body.get("created_at"))
        parsed = images_from_body(body)
        return ImagesResponse(parsed.created, parsed.data)  # Ark's usage is not OpenAI's: not passed on
