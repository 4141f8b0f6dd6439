"""Alibaba DashScope / Model Studio (Wan, Qwen-Image): an asynchronous task, submitted then polled.

The base URL ends in ``/api/v1`` (``https://dashscope-intl.aliyuncs.com/api/v1`` and the other regions). Sizes are
sent as ``W*H`` by the rules of the model's family (``RULES``): the nearest of its fixed sizes (by aspect ratio,
then area), or the requested aspect scaled into its side or area limits; ``n`` goes in ``parameters.n``, split into
as many tasks as the model needs. Models the table does not know follow the channel's config. The task is polled
within the request, with backoff, until the request's time runs out; a task given up on is not charged to the
client. Moderation failures (``DataInspectionFailed``) are refusals."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import ClassVar

from channels.adapters.base import Adapter, ChannelTarget, Poll, classify, only_keys
from channels.adapters.convert import dimensions
from openopen8.core.errors import ContentPolicyViolation, GatewayError, UpstreamError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

PARAMETERS = ("seed", "watermark", "prompt_extend", "style")


@dataclass(frozen=True)
class Config:
    min_side: int = 512
    max_side: int = 1440
    max_n: int = 4
    poll_interval: float = 1.0


@dataclass(frozen=True)
class Rule:
    """The sizes and ``n`` a family of models takes: fixed ``sizes``, else sides within ``sides``, else a total
    area within ``area`` at an aspect of at most ``max_aspect``."""

    max_n: int
    sizes: tuple[tuple[int, int], ...] = ()
    sides: tuple[int, int] | None = None
    area: tuple[int, int] | None = None
    max_aspect: float = 4.0


# Alibaba Model Studio's text-to-image references, by prefix of the provider model (the first that matches).
RULES = (
    ("qwen-image-plus", Rule(1, sizes=((1664, 928), (1472, 1104), (1328, 1328), (1104, 1472), (928, 1664)))),
    ("qwen-image-max", Rule(1, sizes=((1664, 928), (1472, 1104), (1328, 1328), (1104, 1472), (928, 1664)))),
    ("qwen-image", Rule(1, sizes=((1664, 928), (1472, 1140), (1328, 1328), (1140, 1472), (928, 1664)))),
    ("wan2.5", Rule(4, area=(768 * 768, 1440 * 1440))),
    ("wanx-v1", Rule(4, sizes=((1024, 1024), (720, 1280), (768, 1152), (1280, 720)))),
    ("wan", Rule(4, sides=(512, 1440))),  # wan2.2, wan2.1, wanx2.1, wanx2.0
)


def rule_for(model: str, config: Config) -> Rule:
    found = next((rule for prefix, rule in RULES if model.startswith(prefix)), None)
    return found or Rule(config.max_n, sides=(config.min_side, config.max_side))


def _nearest(wh: tuple[int, int], sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    aspect, area = math.log(wh[0] / wh[1]), math.log(wh[0] * wh[1])
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 3),
                                     abs(math.log(s[0] * s[1]) - area)))


def _in_sides(wh: tuple[int, int], low: int, high: int) -> tuple[int, int]:
    scale = min(1.0, high / max(wh))
    scale = max(scale, low / min(wh))
    width, height = (max(16, round(side * scale / 16) * 16) for side in wh)
    return min(width, high), min(height, high)


def _in_area(wh: tuple[int, int], low: int, high: int, max_aspect: float) -> tuple[int, int]:
    aspect = min(max(wh[0] / wh[1], 1 / max_aspect), max_aspect)
    area = min(max(wh[0] * wh[1], low), high)
    width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    # Sides on multiples of 16: of the four roundings, the one nearest the aspect whose area stays in the limits.
    candidates = [(w, h) for w in (math.floor(width / 16) * 16, math.ceil(width / 16) * 16)
                  for h in (math.floor(height / 16) * 16, math.ceil(height / 16) * 16) if low <= w * h <= high]
    return min(candidates, key=lambda s: abs(math.log(s[0] / s[1] / aspect)), default=(round(width), round(height)))


def fit(size: str | None, rule: Rule) -> str | None:
    """``W*H`` for DashScope: a size the model's rule accepts, as near the requested one as it allows."""
    wh = dimensions(size)
    if wh is None:
        return None
    if rule.sizes:
        width, height = _nearest(wh, rule.sizes)
    elif rule.area:
        width, height = _in_area(wh, *rule.area, rule.max_aspect)
    else:
        width, height = _in_sides(wh, *(rule.sides or (1, 1 << 16)))
    return f"{width}*{height}"


class DashScopeAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"min_side", "max_side", "max_n", "poll_interval"})
    endpoints = frozenset({"generations"})
    max_input_images = 0
    file_fields = frozenset()

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, DashScopeAdapter.config_keys)
        config = Config(**raw)
        if not (0 < config.min_side <= config.max_side and 1 <= config.max_n <= 10 and config.poll_interval > 0):
            raise ValueError("need 0 < min_side <= max_side, max_n from 1 to 10 and a positive poll_interval")
        return config

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return rule_for(target.provider_model(req.model), target.config).max_n

    def _headers(self, target: ChannelTarget) -> dict[str, str]:
        return {"Authorization": f"Bearer {target.api_key}"}

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        prompt: JSONDict = {"prompt": req.prompt}
        if isinstance(req.fields.get("negative_prompt"), str):
            prompt["negative_prompt"] = req.fields["negative_prompt"]
        parameters: JSONDict = {"n": req.n, **{k: req.fields[k] for k in PARAMETERS if k in req.fields}}
        model = target.provider_model(req.model)
        size = fit(req.size, rule_for(model, target.config))
        if size:
            parameters["size"] = size
        body = {"model": model, "input": prompt, "parameters": parameters}
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/services/aigc/text2image/image-synthesis",
                               {**self._headers(target), "X-DashScope-Async": "enable"}, json=body)

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse | Poll:
        body = resp.json()
        output = body.get("output") if isinstance(body, dict) else None
        if not isinstance(output, dict) or not output.get("task_id"):
            raise UpstreamError("The provider sent a malformed answer (no task).", channel_fault=True)
        status = output.get("task_status")
        poll = Poll(UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/tasks/{output['task_id']}",
                                    self._headers(target)), after=target.config.poll_interval)
        if status in ("PENDING", "RUNNING", "SUSPENDED"):
            return poll
        if status == "SUCCEEDED":
            urls = [r["url"] for r in output.get("results") or [] if isinstance(r, dict) and r.get("url")]
            return ImagesResponse(created=int(time.time()), data=[ImageData(url=u) for u in urls])
        message = str(output.get("message") or f"the task ended {status}")
        if output.get("code") in ("DataInspectionFailed", "IPInfringementSuspect"):
            raise ContentPolicyViolation(message)
        raise UpstreamError(f"The provider's task failed: {message}", channel_fault=True)

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        try:
            body = json.loads(resp.content)
            code, message = body.get("code"), str(body.get("message") or f"HTTP {resp.status}")
        except (ValueError, AttributeError):
            code, message = None, f"HTTP {resp.status}"
        return classify(resp, message, code=code)
