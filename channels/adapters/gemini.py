"""Google Gemini API: Gemini image models through ``generateContent`` with an image response modality, and Imagen
through ``predict``, chosen by the provider model's name (``imagen-…`` uses ``predict``).

The base URL ends in ``/v1beta``; the key goes in ``x-goog-api-key``. Sizes become the nearest aspect ratio the model
documents, and, for models with resolution tiers, the nearest tier (quality hd/high: at least 2K). Gemini makes one
image a call (the gateway calls in parallel), Imagen up to four. Input images for edits go as inline parts (no
mask). Blocked prompts and filtered images are refusals; Google's error model decides whose fault a failure is."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass
from typing import ClassVar

from channels.adapters.base import Adapter, ChannelTarget, classify, key_rejected, rate_limited, retry_after
from channels.adapters.convert import dimensions, nearest_ratio
from openopen8.core.errors import ContentPolicyViolation, GatewayError, UpstreamError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
IMAGEN_RATIOS = ["1:1", "3:4", "4:3", "9:16", "16:9"]
# The tiers by the longest side they reach (their 21:9 images): 1K up to 1584 px, 2K up to 3168.
TIERS = {"1K": 1600, "2K": 3200, "4K": 1 << 16}
# Finish reasons of a candidate whose image was withheld (IMAGE_OTHER: made, then filtered, and not billed).
BLOCKED = {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "SAFETY",
           "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"}
# google.api.ErrorReason values that say the key, or the project it belongs to, cannot be used: set it aside.
KEY_REASONS = {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED",
               "API_KEY_IP_ADDRESS_BLOCKED", "API_KEY_ANDROID_APP_BLOCKED", "API_KEY_IOS_APP_BLOCKED",
               "SERVICE_DISABLED", "BILLING_DISABLED", "CONSUMER_SUSPENDED", "CONSUMER_INVALID", "USER_PROJECT_DENIED",
               "ACCOUNT_STATE_INVALID", "CREDENTIALS_MISSING"}
QUOTA_REASONS = {"RATE_LIMIT_EXCEEDED", "RESOURCE_QUOTA_EXCEEDED"}
CHANNEL_STATUSES = {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "FAILED_PRECONDITION", "NOT_FOUND"}


@dataclass(frozen=True)
class Family:
    """What a family of Gemini image models documents: its aspect ratios and its ``imageSize`` tiers (none: the
    model has only its default, 1K, and must not be sent the field)."""

    ratios: tuple[str, ...]
    tiers: tuple[str, ...] = ()


# Matched by prefix of the provider model, longest first; other models get the ten common ratios and no tier.
FAMILIES = (
    ("gemini-3.1-flash-image", Family((*RATIOS, "1:4", "4:1", "1:8", "8:1"), ("1K", "2K", "4K"))),
    ("gemini-3-pro-image", Family(tuple(RATIOS), ("1K", "2K", "4K"))),
    ("gemini-2.5-flash-image", Family(tuple(RATIOS))),
)


@dataclass(frozen=True)
class Config:
    with_text: bool = False  # ask for ["TEXT", "IMAGE"] instead of ["IMAGE"]
    image_sizes: tuple[str, ...] | None = None  # tiers of a model the table does not know


def family(model: str, config: Config) -> Family:
    found = next((f for prefix, f in FAMILIES if model.startswith(prefix)), Family(tuple(RATIOS)))
    return found if config.image_sizes is None else Family(found.ratios, config.image_sizes)


def tier(req: ImageRequest, tiers: tuple[str, ...]) -> str | None:
    """The smallest tier whose images are as long as the size asks (quality hd/high: 2K at least), or the largest
    of ``tiers`` below it; ``None`` for 1K, the models' default, or a model without tiers."""
    if not tiers:
        return None
    wh = dimensions(req.size)
    longest = max(wh) if wh else 0
    floor = TIERS["2K"] if req.quality in ("hd", "high") else 0
    wanted = next(t for t in TIERS if TIERS[t] >= longest and TIERS[t] >= floor)
    chosen = max((t for t in tiers if TIERS[t] <= TIERS[wanted]), key=TIERS.__getitem__, default=tiers[0])
    return None if chosen == "1K" else chosen


def google_error(content: bytes) -> tuple[str, str, set[str], int | None]:
    """Google's error model: ``(message, status, reasons, retry-after seconds)`` read from ``error.status`` and the
    ``ErrorInfo``/``RetryInfo`` entries of ``error.details``."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return "", "", set(), None
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    reasons = {str(d["reason"]) for d in details if d.get("reason")}
    delays = [re.fullmatch(r"(\d+(?:\.\d+)?)s", str(d.get("retryDelay", ""))) for d in details]
    after = next((math.ceil(float(m.group(1))) for m in delays if m), None)
    return str(error.get("message") or ""), str(error.get("status") or ""), reasons, after


def _is_imagen(req: ImageRequest, target: ChannelTarget) -> bool:
    return target.provider_model(req.model).startswith("imagen")


class GeminiAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"with_text", "image_sizes"})
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 10
    file_fields = frozenset({"image"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        unknown = set(raw) - GeminiAdapter.config_keys
        sizes = raw.get("image_sizes")
        if unknown or not isinstance(raw.get("with_text", False), bool) or not (
                sizes is None or isinstance(sizes, list) and set(sizes) <= set(TIERS)):
            raise ValueError("the keys are with_text (true or false) and image_sizes (a list of 1K, 2K, 4K)")
        sorted_sizes = None if sizes is None else tuple(sorted(set(sizes), key=TIERS.__getitem__))
        return Config(with_text=raw.get("with_text", False), image_sizes=sorted_sizes)

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return 4 if _is_imagen(req, target) else 1

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        model, base = target.provider_model(req.model), target.base_url.rstrip("/")
        headers = {"x-goog-api-key": target.api_key}
        if _is_imagen(req, target):
            parameters: JSONDict = {"sampleCount": req.n, "includeRaiReason": True}
            ratio = nearest_ratio(req.size, IMAGEN_RATIOS)
            if ratio:
                parameters["aspectRatio"] = ratio
            body: JSONDict = {"instances": [{"prompt": req.prompt}], "parameters": parameters}
            return UpstreamRequest("POST", f"{base}/models/{model}:predict", headers, json=body)
        parts: list[JSONDict] = [{"text": req.prompt}]
        parts += [{"inlineData": {"mimeType": i.content_type, "data": base64.b64encode(i.read()).decode()}}
                  for i in req.images]
        image_config: JSONDict = {}
        models = family(model, target.config)
        ratio = nearest_ratio(req.size, list(models.ratios))
        if ratio:
            image_config["aspectRatio"] = ratio
        size = tier(req, models.tiers)
        if size:
            image_config["imageSize"] = size
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
        if not body and _is_imagen(req, target):
            # Imagen answers {} when its filters removed every image.
            raise ContentPolicyViolation("Your request was rejected by the provider's safety system (every image "
                                         "was filtered).")
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

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        message, status, reasons, after = google_error(resp.content)
        message = message or f"HTTP {resp.status}"
        if reasons & KEY_REASONS or status == "UNAUTHENTICATED":
            return key_rejected(resp, message, names_key=True)
        if status == "PERMISSION_DENIED":  # the key's, or this request's (a tuned model): a probe of the key decides
            return key_rejected(resp, message, names_key=False)
        if status == "RESOURCE_EXHAUSTED" or reasons & QUOTA_REASONS:
            return rate_limited(resp, after if after is not None else retry_after(resp))
        if status in CHANNEL_STATUSES:
            return UpstreamError(f"The provider failed ({status}): {message}", channel_fault=True)
        return classify(resp, message)
