"""AUTOMATIC1111 / Forge stable-diffusion-webui: ``/sdapi/v1/txt2img`` with size, n and sampler translated."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from channels.adapters.base import Adapter, ChannelTarget, classify, only_keys
from channels.adapters.convert import repaint_mask
from openopen8.core.errors import GatewayError, InvalidRequest, UpstreamError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict


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
    # img2img (edits and variations): how far to move from the input, and the mask's blur in pixels.
    denoising_strength: float = 0.75
    mask_blur: int = 4


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    width, _, height = size.partition("x")
    if not (width.isdecimal() and height.isdecimal() and 64 <= int(width) <= 8192 and 64 <= int(height) <= 8192):
        raise InvalidRequest(f"Invalid size '{size}': expected WIDTHxHEIGHT in pixels, 64 to 8192 each.", param=param)
    return int(width), int(height)


class SDWebUIAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset(f.name for f in fields(Config))
    # img2img takes one init image, and a mask; no markup.
    max_input_images = 1
    file_fields = frozenset({"image", "mask"})


    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, SDWebUIAdapter.config_keys)
        checks: dict[str, Any] = {"steps": int, "cfg_scale": (int, float), "sampler": str, "scheduler": str,
                                  "negative_prompt": str, "default_size": str, "quality_steps": dict,
                                  "denoising_strength": (int, float), "mask_blur": int}
        for key, value in raw.items():
            if not isinstance(value, checks[key]) or isinstance(value, bool):
                raise ValueError(f"{key} has the wrong type")
        if not 1 <= raw.get("steps", 25) <= 150:
            raise ValueError("steps must be between 1 and 150")
        if not all(isinstance(v, int) and 1 <= v <= 150 for v in raw.get("quality_steps", {}).values()):
            raise ValueError("quality_steps values must be step counts between 1 and 150")
        if not 0 <= raw.get("denoising_strength", 0.75) <= 1:
            raise ValueError("denoising_strength must be between 0 and 1")
        if not 0 <= raw.get("mask_blur", 4) <= 64:
            raise ValueError("mask_blur must be between 0 and 64 pixels")
        try:
            parse_size(raw.get("default_size", "1024x1024"))
        except InvalidRequest as e:
            raise ValueError(f"default_size: {e.message}") from None
        return Config(**raw)

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        config: Config = target.config
        if req.size and req.size != "auto":
            width, height = parse_size(req.size)
        elif req.images:  # an edit keeps its input's size, on the multiple of 8 the model works in
            width, height = max(64, req.images[0].width // 8 * 8), max(64, req.images[0].height // 8 * 8)
        else:
            width, height = parse_size(config.default_size)
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
        route = "txt2img"
        if req.images:
            route = "img2img"
            body.update(init_images=[base64.b64encode(req.images[0].read()).decode()], resize_mode=0,
                        denoising_strength=config.denoising_strength)
        if req.mask is not None:
            body.update(mask=base64.b64encode(repaint_mask(req.mask.read())).decode(), mask_blur=config.mask_blur,
                        inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=0)
        user, sep, password = target.api_key.partition(":")
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/sdapi/v1/{route}", json=body,
                               auth=(user, password) if sep else None)

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        user, sep, password = target.api_key.partition(":")
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/sdapi/v1/sd-models",
                               auth=(user, password) if sep else None)

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        body = resp.json()
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UpstreamError("The provider sent a malformed answer (no images list).", channel_fault=True)
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
