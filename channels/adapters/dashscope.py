"""Alibaba DashScope / Model Studio (Wan, Qwen-Image): an asynchronous task, submitted then polled.

The base URL ends in ``/api/v1`` (``https://dashscope-intl.aliyuncs.com/api/v1`` and the other regions). Sizes are
sent as ``W*H``, scaled to fit the model's side limits; ``n`` goes in ``parameters.n`` (up to four a task). The task is
polled within the request, with backoff, until the request's time runs out; a task given up on is not charged to
the client. Moderation failures (``DataInspectionFailed``) are refusals."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

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


def fit(size: str | None, config: Config) -> str | None:
    """``W*H`` for DashScope: the same aspect, scaled into [min_side, max_side], on multiples of 16."""
    wh = dimensions(size)
    if wh is None:
        return None
    scale = min(1.0, config.max_side / max(wh))
    scale = max(scale, config.min_side / min(wh))
    width, height = (max(16, round(side * scale / 16) * 16) for side in wh)
    return f"{min(width, config.max_side)}*{min(height, config.max_side)}"


class DashScopeAdapter(Adapter):
    endpoints = frozenset({"generations"})
    max_input_images = 0
    file_fields = frozenset()

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, {"min_side", "max_side", "max_n", "poll_interval"})
        config = Config(**raw)
        if not (0 < config.min_side <= config.max_side and 1 <= config.max_n <= 10 and config.poll_interval > 0):
            raise ValueError("need 0 < min_side <= max_side, max_n from 1 to 10 and a positive poll_interval")
        return config

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return int(target.config.max_n)

    def _headers(self, target: ChannelTarget) -> dict[str, str]:
        return {"Authorization": f"Bearer {target.api_key}"}

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        prompt: JSONDict = {"prompt": req.prompt}
        if isinstance(req.fields.get("negative_prompt"), str):
            prompt["negative_prompt"] = req.fields["negative_prompt"]
        parameters: JSONDict = {"n": req.n, **{k: req.fields[k] for k in PARAMETERS if k in req.fields}}
        size = fit(req.size, target.config)
        if size:
            parameters["size"] = size
        body = {"model": target.provider_model(req.model), "input": prompt, "parameters": parameters}
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
