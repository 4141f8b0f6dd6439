"""ComfyUI: a workflow (API format) stored in the channel's config, with placeholders the gateway fills in, queued,
waited for, and its output images fetched from the server's ``/view``.

Placeholders are strings in node inputs: ``{{prompt}}``, ``{{negative_prompt}}``, ``{{width}}``, ``{{height}}``,
``{{seed}}``, ``{{batch_size}}`` and ``{{image}}`` (an edit's input, uploaded first, with the mask as its alpha:
ComfyUI's LoadImage reads transparent as "repaint", as OpenAI does). A workflow without ``{{batch_size}}`` makes one
image a run; the gateway runs it in parallel for ``n``."""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

from channels.adapters.base import Adapter, ChannelTarget, Poll, only_keys
from channels.adapters.convert import dimensions, with_mask_as_alpha
from openopen8.core.errors import UpstreamError
from openopen8.core.http import UploadPart, UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict


@dataclass(frozen=True)
class Config:
    workflow: JSONDict
    default_size: str = "1024x1024"
    poll_interval: float = 1.0


def fill(value: Any, values: dict[str, Any]) -> Any:
    """The workflow with every placeholder replaced: a whole-string placeholder takes the value's own type."""
    if isinstance(value, dict):
        return {k: fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, values) for v in value]
    if isinstance(value, str) and value.startswith("{{") and value.endswith("}}") and value[2:-2] in values:
        return values[value[2:-2]]
    if isinstance(value, str):
        for name, replacement in values.items():
            value = value.replace("{{" + name + "}}", str(replacement))
    return value


def _malformed(why: str) -> UpstreamError:
    return UpstreamError(f"The provider sent a malformed answer ({why}).", channel_fault=True)


class ComfyUIAdapter(Adapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"workflow", "default_size", "poll_interval"})
    endpoints = frozenset({"generations", "edits"})
    max_input_images = 1
    file_fields = frozenset({"image", "mask"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:
        only_keys(raw, ComfyUIAdapter.config_keys)
        workflow = raw.get("workflow")
        if not isinstance(workflow, dict) or not workflow or not all(
                isinstance(node, dict) and "class_type" in node for node in workflow.values()):
            raise ValueError("workflow must be a ComfyUI API-format graph: {node id: {class_type, inputs}}")
        if "{{prompt}}" not in json.dumps(workflow):
            raise ValueError("workflow needs a {{prompt}} placeholder")
        if dimensions(raw.get("default_size", "1024x1024")) is None:
            raise ValueError("default_size must be WIDTHxHEIGHT")
        return Config(**raw)

    def images_per_call(self, req: ImageRequest, target: ChannelTarget) -> int:
        return 10 if "{{batch_size}}" in json.dumps(target.config.workflow) else 1

    def _queue(self, req: ImageRequest, target: ChannelTarget, image_name: str | None) -> UpstreamRequest:
        config: Config = target.config
        width, height = dimensions(req.size) or (
            (req.images[0].width, req.images[0].height) if req.images else dimensions(config.default_size) or (0, 0))
        seed = req.fields.get("seed")
        values = {"prompt": req.prompt, "negative_prompt": str(req.fields.get("negative_prompt", "")),
                  "width": width, "height": height, "batch_size": req.n,
                  "seed": seed if isinstance(seed, int) else random.randrange(2**32), "image": image_name or ""}
        body = {"prompt": fill(config.workflow, values), "client_id": uuid.uuid4().hex}
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/prompt", json=body)

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        if not req.images:
            return self._queue(req, target, None)
        merged = io.BytesIO(with_mask_as_alpha(req.images[0], req.mask))
        name = f"openopen8-{uuid.uuid4().hex}.png"
        return UpstreamRequest("POST", f"{target.base_url.rstrip('/')}/upload/image", form={"overwrite": "true"},
                               files=(UploadPart("image", name, merged, "image/png"),))

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/system_stats")

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse | Poll:
        body, base = resp.json(), target.base_url.rstrip("/")
        if not isinstance(body, dict):
            raise _malformed("not an object")
        after = target.config.poll_interval
        if "name" in body and "type" in body:  # the edit's image is uploaded: queue the workflow
            return Poll(self._queue(req, target, str(body["name"])), after=0)
        if "prompt_id" in body:
            if body.get("node_errors"):
                raise UpstreamError(f"The workflow was rejected: {json.dumps(body['node_errors'])[:300]}",
                                    channel_fault=True)
            return Poll(UpstreamRequest("GET", f"{base}/history/{body['prompt_id']}"), after=after)
        again = Poll(UpstreamRequest("GET", resp.url), after=after)
        if not body:  # not in the history yet: still queued or running
            return again
        entry = next(iter(body.values()))
        status = (entry.get("status") or {}).get("status_str")
        if status == "error":
            raise UpstreamError("The workflow failed on the server.", channel_fault=True)
        images = [img for node in (entry.get("outputs") or {}).values() for img in node.get("images") or []
                  if img.get("type", "output") == "output"]
        if not images:
            if not (entry.get("status") or {}).get("completed", True):
                return again
            raise _malformed("the workflow produced no output images")
        data = [ImageData(url=f"{base}/view?" + urlencode(
            {"filename": i["filename"], "subfolder": i.get("subfolder", ""), "type": "output"})) for i in images]
        return ImagesResponse(created=int(time.time()), data=data)
