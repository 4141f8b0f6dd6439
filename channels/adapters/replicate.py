"""Replicate predictions: ``Prefer: wait`` for a synchronous answer, falling back to polling the prediction.

The provider model is ``owner/name`` (an official model) or ``owner/name:version``. Model inputs differ per model, so
the channel's config maps OpenAI's fields to them: ``inputs`` (e.g. ``{"n": "num_outputs", "image": "image"}``),
``size_as`` (``aspect_ratio``, ``width_height`` or omit), ``max_outputs`` per prediction, and ``static_input``
merged into every prediction. Images and masks go as data URLs; outputs are URLs the gateway downloads.

OpenAI's mask marks the pixels to edit by transparency; inpainting models on Replicate (FLUX Fill and most others)
take a black-and-white mask where white is inpainted. ``mask_as`` says which the model wants: ``white`` (default),
``black`` (black is inpainted) or ``alpha`` (the client's mask unchanged)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from channels.adapters.base import Adapter, ChannelTarget, Poll, classify, only_keys
from channels.adapters.convert import data_url, dimensions, nearest_ratio, repaint_mask
from openopen8.core.errors import ContentPolicyViolation, GatewayError, UpstreamError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
MAPPABLE = ("prompt", "n", "image", "mask", "negative_prompt", "seed", "output_format")
MASKS = ("white", "black", "alpha")


@dataclass(frozen=True)
class Config:
    inputs: dict[str, str] = field(default_factory=lambda: {"prompt": "prompt"})
    size_as: str | None = "aspect_ratio"
    max_outputs: int = 1
    static_input: dict[str, Any] = field(default_factory=dict)
    wait: int = 60
    poll_interval: float = 1.0
    mask_as: str = "white"


class ReplicateAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"inputs", "size_as", "max_outputs", "static_input", "wait",
                                                       "poll_interval", "mask_as"})
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 1
    file_fields = frozenset({"image", "mask"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, ReplicateAdapter.config_keys)
        inputs = raw.get("inputs", {"prompt": "prompt"})
        if not isinstance(inputs, dict) or set(inputs) - set(MAPPABLE) or "prompt" not in inputs:
            raise ValueError(f"inputs maps some of {', '.join(MAPPABLE)} (prompt at least) to the model's input names")
        if raw.get("size_as") not in (None, "aspect_ratio", "width_height") or not isinstance(
                raw.get("static_input", {}), dict):
            raise ValueError("size_as is aspect_ratio, width_height or null; static_input is an object")
        if raw.get("mask_as", "white") not in MASKS:
            raise ValueError(f"mask_as is one of {', '.join(MASKS)}")
        config = Config(**{**raw, "inputs": inputs})
        if not (1 <= config.max_outputs <= 10 and 1 <= config.wait <= 60 and config.poll_interval > 0):
            raise ValueError("max_outputs is 1 to 10, wait 1 to 60 seconds, poll_interval positive")
        return config

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return int(target.config.max_outputs) if "n" in target.config.inputs else 1

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        config: Config = target.config
        names, values = config.inputs, {**req.fields, "prompt": req.prompt, "n": req.n}
        if req.images:
            values["image"] = data_url(req.images[0])
        if req.mask is not None and config.mask_as == "alpha":
            values["mask"] = data_url(req.mask)
        elif req.mask is not None:
            mask = repaint_mask(req.mask.read(), repaint_white=config.mask_as == "white")
            values["mask"] = f"data:image/png;base64,{base64.b64encode(mask).decode()}"
        model_input = {**config.static_input, **{names[k]: values[k] for k in names if k in values}}
        if config.size_as == "aspect_ratio" and nearest_ratio(req.size, RATIOS):
            model_input["aspect_ratio"] = nearest_ratio(req.size, RATIOS)
        elif config.size_as == "width_height" and dimensions(req.size):
            model_input["width"], model_input["height"] = dimensions(req.size)  # type: ignore[misc]
        model, base = target.provider_model(req.model), target.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {target.api_key}", "Prefer": f"wait={config.wait}"}
        if ":" in model:
            return UpstreamRequest("POST", f"{base}/predictions", headers,
                                   json={"version": model.split(":", 1)[1], "input": model_input})
        return UpstreamRequest("POST", f"{base}/models/{model}/predictions", headers, json={"input": model_input})

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/account",
                               {"Authorization": f"Bearer {target.api_key}"})

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse | Poll:
        prediction = resp.json()
        if not isinstance(prediction, dict) or "status" not in prediction:
            raise UpstreamError("The provider sent a malformed answer (no prediction).", channel_fault=True)
        status = prediction["status"]
        if status in ("starting", "processing"):
            url = ((prediction.get("urls") or {}).get("get")
                   or f"{target.base_url.rstrip('/')}/predictions/{prediction.get('id')}")
            return Poll(UpstreamRequest("GET", url, {"Authorization": f"Bearer {target.api_key}"}),
                        after=target.config.poll_interval)
        if status == "succeeded":
            output = prediction.get("output")
            urls = [output] if isinstance(output, str) else [u for u in output or [] if isinstance(u, str)]
            return ImagesResponse(created=int(time.time()), data=[ImageData(url=u) for u in urls])
        error = str(prediction.get("error") or f"the prediction ended {status}")
        if any(word in error.lower() for word in ("nsfw", "safety", "sensitive", "flagged")):
            raise ContentPolicyViolation(f"Your request was rejected by the provider's safety checker: {error}")
        raise UpstreamError(f"The provider's prediction failed: {error}", channel_fault=True)

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        try:
            body = json.loads(resp.content)
            title, message = str(body.get("title") or ""), str(body.get("detail") or body.get("title") or "")
        except (ValueError, AttributeError):
            title, message = "", ""
        message = message or f"HTTP {resp.status}"
        if title.startswith("Invalid version"):  # 422 for the channel's model, or an account without billing
            return UpstreamError(f"The provider will not run the channel's model: {message}", channel_fault=True)
        return classify(resp, message)
