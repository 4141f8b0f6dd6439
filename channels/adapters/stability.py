"""Stability AI v2beta: ``stable-image/generate/{core,ultra,sd3}`` and ``edit/inpaint``, multipart in, JSON out.

One image per call (the gateway calls in parallel for ``n``); the size becomes the nearest aspect ratio; quality picks
the endpoint (config ``quality_endpoints``, e.g. hd -> ultra); the mask becomes Stability's (white = repaint)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import ClassVar

from channels.adapters.base import Adapter, ChannelTarget, classify, only_keys
from channels.adapters.convert import nearest_ratio, repaint_mask
from openopen8.core.errors import ContentPolicyViolation, GatewayError, UpstreamError
from openopen8.core.http import UploadPart, UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

RATIOS = ["21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21"]
ENDPOINTS = ("core", "ultra", "sd3")
PASSED = ("negative_prompt", "seed", "style_preset", "cfg_scale", "grow_mask")


@dataclass(frozen=True)
class Config:
    endpoint: str = "core"
    quality_endpoints: dict[str, str] = field(default_factory=lambda: {"hd": "ultra", "high": "ultra"})
    style_preset: str | None = None


class StabilityAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"endpoint", "quality_endpoints", "style_preset"})
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 1
    file_fields = frozenset({"image", "mask"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, StabilityAdapter.config_keys)
        if not isinstance(raw.get("quality_endpoints", {}), dict) or not isinstance(raw.get("style_preset", ""), str):
            raise ValueError("quality_endpoints must map qualities to endpoints; style_preset must be text")
        config = Config(**raw)
        chosen = [config.endpoint, *config.quality_endpoints.values()]
        if any(e not in ENDPOINTS for e in chosen):
            raise ValueError(f"endpoints must be among {', '.join(ENDPOINTS)}")
        return config

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return 1

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        config: Config = target.config
        form = {"prompt": req.prompt}
        form.update({k: str(req.fields[k]) for k in PASSED if k in req.fields})
        if config.style_preset and "style_preset" not in form:
            form["style_preset"] = config.style_preset
        if req.fields.get("output_format") in ("png", "jpeg", "webp"):
            form["output_format"] = req.fields["output_format"]
        files: list[UploadPart] = []
        if req.endpoint == "edits":
            path = "edit/inpaint"
            image = req.images[0]
            files.append(UploadPart("image", image.filename, image.file, image.content_type))
            if req.mask is not None:  # without one, Stability reads the image's alpha: transparent = repaint
                files.append(UploadPart("mask", "mask.png", io.BytesIO(repaint_mask(req.mask.read())),
                                        "image/png"))
        else:
            endpoint = config.quality_endpoints.get(req.quality or "", config.endpoint)
            path = f"generate/{endpoint}"
            ratio = nearest_ratio(req.size, RATIOS)
            if ratio:
                form["aspect_ratio"] = ratio
            model = target.provider_model(req.model)
            if endpoint == "sd3" and model.startswith("sd3"):
                form["model"] = model
        headers = {"Authorization": f"Bearer {target.api_key}", "Accept": "application/json"}
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/v2beta/stable-image/{path}", headers,
                               form=form, files=tuple(files))

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/v1/user/balance",
                               {"Authorization": f"Bearer {target.api_key}"})

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise UpstreamError("The provider sent a malformed answer (no image).", channel_fault=True)
        if body.get("finish_reason") == "CONTENT_FILTERED":
            # Stability blurs a filtered image and still answers 200: the client gets the refusal, not the blur.
            raise ContentPolicyViolation("Your request was rejected by the provider's content filter.")
        return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=body["image"])])

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        try:
            body = json.loads(resp.content)
            name, errors = body.get("name"), body.get("errors") or []
        except (ValueError, AttributeError):
            name, errors = None, []
        message = "; ".join(str(e) for e in errors) or f"HTTP {resp.status}"
        return classify(resp, message, code=name)
