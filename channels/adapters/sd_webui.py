"""AUTOMATIC1111 / Forge stable-diffusion-webui: ``/sdapi/v1/txt2img`` with size, n and sampler translated."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from typing import Any

from channels.adapters.base import Adapter, ChannelTarget, classify
from channels.http import UpstreamRequest, UpstreamResponse
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict


@dataclass(frozen=True)
class Config:
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str | None = None
    scheduler: str | None = None
    negative_prompt: str = ""
    default_size: str = "1024x1024"
    # Steps per OpenAI quality ("low", "hd", ...); a quality not listed uses ``steps``.
    quality_steps: dict[str, int] = field(default_factory=dict)


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit() and 64 <= int(width) <= 8192 and 64 <= int(height) <= 8192):
        raise InvalidRequest(f"Invalid size '{size}': expected WIDTHxHEIGHT in pixels, 64 to 8192 each.", param=param)
    return int(width), int(height)


class SDWebUIAdapter(Adapter):

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        known = {f.name: f.type for f in fields(Config)}
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))} (allowed: {', '.join(known)})")
        checks: dict[str, Any] = {"steps": int, "cfg_scale": (int, float), "sampler": str, "scheduler": str,
                                  "negative_prompt": str, "default_size": str, "quality_steps": dict}
        for key, value in raw.items():
            if not isinstance(value, checks[key]) or isinstance(value, bool):
                raise ValueError(f"{key} has the wrong type")
        if not 1 <= raw.get("steps", 25) <= 150:
            raise ValueError("steps must be between 1 and 150")
        if not all(isinstance(v, int) and 1 <= v <= 150 for v in raw.get("quality_steps", {}).values()):
            raise ValueError("quality_steps values must be step counts between 1 and 150")
        try:
            parse_size(raw.get("default_size", "1024x1024"))
        except InvalidRequest as e:
            raise ValueError(f"default_size: {e.message}") from None
        return Config(**raw)

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        config: Config = target.config
        size = req.size if req.size and req.size != "auto" else config.default_size
        width, height = parse_size(size)
        body: JSONDict = {
            "prompt": req.prompt,
            "negative_prompt": req.fields.get("negative_prompt", config.negative_prompt),
            "width": width,
            "height": height,
            "batch_size": req.n,
            "n_iter": 1,
            "steps": config.quality_steps.get(req.quality or "", config.steps),
            "cfg_scale": config.cfg_scale,
            "seed": req.fields["seed"] if isinstance(req.fields.get("seed"), int) else -1,
        }
        if config.sampler:
            body["sampler_name"] = config.sampler
        if config.scheduler:
            body["scheduler"] = config.scheduler
        checkpoint = target.provider_model(req.model)
        if checkpoint != req.model:
            body["override_settings"] = {"sd_model_checkpoint": checkpoint}
        user, sep, password = target.api_key.partition(":")
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/sdapi/v1/txt2img", json=body,
                               auth=(user, password) if sep else None)

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest) -> ImagesResponse:
        body = resp.json()
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UpstreamError("The provider sent a malformed answer (no images list).", channel_fault=True,
                                retryable=True)
        try:
            first = int(json.loads(body.get("info") or "{}").get("index_of_first_image", 0))
        except (ValueError, AttributeError, TypeError):
            first = 0
        # A grid may come first and mask images after; take exactly the n images asked for.
        chosen = images[first:first + req.n]
        return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b64) for b64 in chosen])

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        try:
            body = json.loads(resp.content)
            detail = str(body.get("detail") or body.get("error") or "") if isinstance(body, dict) else ""
        except ValueError:
            detail = ""
        error = classify(resp, detail or f"HTTP {resp.status}")
        if isinstance(error, InvalidRequest):
            # The web UI has no notion of a client's fault: a rejected request is this channel's translation or
            # config (an unknown sampler, say), so another channel may still serve it.
            return UpstreamError(f"The provider rejected the request (HTTP {resp.status}): {error.message}",
                                 channel_fault=True)
        return error
