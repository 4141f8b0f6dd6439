"""Google Gemini API: Gemini image models through ``generateContent`` with an image response modality, and Imagen
through ``predict``, chosen by the provider model's name (``imagen-…`` uses ``predict``).

The base URL ends in ``/v1beta``; the key goes in ``x-goog-api-key``. Sizes become the nearest aspect ratio; quality
hd/high asks Gemini for a 2K image. Gemini makes one image a call (the gateway calls in parallel), Imagen up to four.
Input images for edits go as inline parts (no mask). Blocked prompts and filtered images are refusals."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from channels.adapters.base import Adapter, ChannelTarget
from channels.adapters.convert import nearest_ratio
from openopen8.core.errors import ContentPolicyViolation, UpstreamError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

GEMINI_RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9"]
IMAGEN_RATIOS = ["1:1", "3:4", "4:3", "9:16", "16:9"]
BLOCKED = {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"}


@dataclass(frozen=True)
class Config:
    with_text: bool = False  # ask for ["TEXT", "IMAGE"] instead of ["IMAGE"]


def _is_imagen(req: ImageRequest, target: ChannelTarget) -> bool:
    return target.provider_model(req.model).startswith("imagen")


class GeminiAdapter(Adapter):
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 10
    file_fields = frozenset({"image"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        unknown = set(raw) - {"with_text"}
        if unknown or not isinstance(raw.get("with_text", False), bool):
            raise ValueError("the only key is with_text (true or false)")
        return Config(**raw)

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return 4 if _is_imagen(req, target) else 1

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        model, base = target.provider_model(req.model), target.base_url.rstrip("/")
        headers = {"x-goog-api-key": target.api_key}
        if _is_imagen(req, target):
            parameters: JSONDict = {"sampleCount": req.n}
            ratio = nearest_ratio(req.size, IMAGEN_RATIOS)
            if ratio:
                parameters["aspectRatio"] = ratio
            body: JSONDict = {"instances": [{"prompt": req.prompt}], "parameters": parameters}
            return UpstreamRequest("POST", f"{base}/models/{model}:predict", headers, json=body)
        parts: list[JSONDict] = [{"text": req.prompt}]
        parts += [{"inlineData": {"mimeType": i.content_type, "data": base64.b64encode(i.read()).decode()}}
                  for i in req.images]
        image_config: JSONDict = {}
        ratio = nearest_ratio(req.size, GEMINI_RATIOS)
        if ratio:
            image_config["aspectRatio"] = ratio
        if req.quality in ("hd", "high"):
            image_config["imageSize"] = "2K"
        config: JSONDict = {"responseModalities": ["TEXT", "IMAGE"] if target.config.with_text else ["IMAGE"]}
        if image_config:
            config["imageConfig"] = image_config
        body = {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}
        return UpstreamRequest("POST", f"{base}/models/{model}:generateContent", headers, json=body)

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/models", {"x-goog-api-key": target.api_key})

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        body = resp.json()
        if not isinstance(body, dict):
            raise UpstreamError("The provider sent a malformed answer.", channel_fault=True)
        images, reasons = [], []
        for prediction in body.get("predictions") or []:
            if prediction.get("bytesBase64Encoded"):
                images.append(ImageData(b64_json=prediction["bytesBase64Encoded"]))
            elif prediction.get("raiFilteredReason"):
                reasons.append(str(prediction["raiFilteredReason"]))
        for candidate in body.get("candidates") or []:
            for part in (candidate.get("content") or {}).get("parts") or []:
                if isinstance(part.get("inlineData"), dict) and part["inlineData"].get("data"):
                    images.append(ImageData(b64_json=part["inlineData"]["data"]))
            if candidate.get("finishReason") in BLOCKED:
                reasons.append(str(candidate["finishReason"]))
        blocked = (body.get("promptFeedback") or {}).get("blockReason")
        if blocked:
            reasons.append(str(blocked))
        if not images and reasons:
            raise ContentPolicyViolation(f"Your request was rejected by the provider's safety system ({reasons[0]}).")
        return ImagesResponse(created=int(time.time()), data=images)

