"""The adapter registry: one line per provider. ``Channel.kind`` choices come from it.

``call`` drives an adapter: it sends what the adapter built, follows ``Poll`` steps of asynchronous providers with
backoff until the call's deadline, and splits ``n`` into parallel calls for providers that make fewer images a call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from django.utils.module_loading import import_string

from channels.adapters.base import REFUSAL_CODES, Adapter, ChannelTarget
from openopen8.core import http
from openopen8.core.errors import GatewayError, UpstreamError, UpstreamTimeout, mask_error
from openopen8.core.http import UpstreamResponse
from openopen8.core.http_pool import MAX_PARALLEL_CALLS
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

__all__ = ["ADAPTERS", "KIND_CHOICES", "REFUSAL_CODES", "Adapter", "ChannelTarget", "call", "call_streaming",
           "get_adapter", "usage_summed"]

ADAPTERS: dict[str, tuple[str, str]] = {
    "openai": ("OpenAI-compatible", "channels.adapters.openai.OpenAICompatibleAdapter"),
    "azure": ("Azure OpenAI", "channels.adapters.azure.AzureAdapter"),
    "stability": ("Stability AI", "channels.adapters.stability.StabilityAdapter"),
    "ark": ("Volcengine Ark (Seedream)", "channels.adapters.ark.ArkAdapter"),
    "dashscope": ("Alibaba DashScope (Wan, Qwen-Image)", "channels.adapters.dashscope.DashScopeAdapter"),
    "gemini": ("Google Gemini and Imagen", "channels.adapters.gemini.GeminiAdapter"),
    "replicate": ("Replicate", "channels.adapters.replicate.ReplicateAdapter"),
    "comfyui": ("ComfyUI", "channels.adapters.comfyui.ComfyUIAdapter"),
    "sd-webui": ("Stable Diffusion web UI (AUTOMATIC1111 / Forge)", "channels.adapters.sd_webui.SDWebUIAdapter"),
    "placeholder": ("Placeholder (demo and tests; no real images)", "channels.adapters.placeholder.PlaceholderAdapter"),
}
KIND_CHOICES = [(kind, label) for kind, (label, _path) in ADAPTERS.items()]
MAX_POLL_WAIT = 5.0


@cache
def get_adapter(kind: str) -> Adapter:
    """The adapter for a channel kind. Raises ``KeyError`` for a kind that is not registered."""
    adapter: Adapter = import_string(ADAPTERS[kind][1])()
    return adapter


def _one_call(adapter: Adapter, target: ChannelTarget, req: ImageRequest, *,
              timeout: float) -> tuple[ImagesResponse, int]:
    deadline, polls = time.monotonic() + timeout, 0
    upstream, latency, left = adapter.build_request(req, target), 0, timeout
    while True:
        resp = adapter.transport(upstream, timeout=left, connect_timeout=target.connect_timeout)
        latency += resp.latency_ms
        if resp.status >= 400:
            # Provider errors reach clients, usage rows and metrics: never with our key, in any form it was sent in,
            # or the provider's address in them.
            raise mask_error(adapter.parse_error(resp, target), *upstream.secrets(), target.api_key,
                             urlsplit(target.base_url).netloc)
        result = adapter.parse_response(resp, req, target)
        if isinstance(result, ImagesResponse):
            return result, latency
        wait = min(result.after * 2 ** (polls // 3), max(result.after, MAX_POLL_WAIT))
        if time.monotonic() + wait >= deadline:
            # The task may still finish at the provider; the client is not charged for it.
            raise UpstreamTimeout(f"The provider's task did not finish within {timeout:g} s.", channel_fault=True,
                                  ambiguous=True)
        time.sleep(wait)
        polls += 1
        upstream, left = result.request, max(deadline - time.monotonic(), 0.1)


def call(target: ChannelTarget, req: ImageRequest, *, timeout: float) -> tuple[ImagesResponse, int]:
    """Send ``req`` to one channel; return OpenAI's shape and the provider's latency in ms.

    Raises a ``GatewayError``: the adapter's reading of a provider error, the transport's for a network fault, or
    ``UpstreamTimeout`` when an asynchronous task outlives ``timeout``. When ``n`` takes several calls and only some
    succeed, the images they made are returned (fewer than asked, charged as delivered).
    """
    adapter = get_adapter(target.kind)
    per_call = max(1, adapter.images_per_call(req, target))
    if req.n <= per_call:
        return _one_call(adapter, target, req, timeout=timeout)
    sizes = [min(per_call, req.n - done) for done in range(0, req.n, per_call)]
    with ThreadPoolExecutor(max_workers=min(len(sizes), MAX_PARALLEL_CALLS)) as pool:
        futures = [pool.submit(_one_call, adapter, target, replace(req, n=size), timeout=timeout) for size in sizes]
    results, errors = [], []
    for future in futures:
        try:
            results.append(future.result())
        except GatewayError as error:
            errors.append(error)
    if not results:
        raise errors[0]
    first = results[0][0]
    data = [image for result, _ in results for image in result.data]
    extra = dict(first.extra)
    usages = [result.extra["usage"] for result, _ in results if isinstance(result.extra.get("usage"), dict)]
    if usages:  # the request's usage is every call's that delivered, as one call for all of n would report it
        extra["usage"] = usage_summed(usages)
    return ImagesResponse(first.created, data, extra), max(latency for _, latency in results)


def usage_summed(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI ``usage`` objects added up: counts summed, nested details too; other values from the first."""
    total: dict[str, Any] = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, dict):
                total[key] = usage_summed([total[key], value]) if isinstance(total.get(key), dict) else dict(value)
            elif isinstance(value, int) and not isinstance(value, bool) and isinstance(total.get(key, 0), int):
                total[key] = total.get(key, 0) + value
            else:
                total.setdefault(key, value)
    return total


# Called with each image event of a streamed answer as it arrives: the event, and its JSON as the provider sent it.
Emit = Callable[[JSONDict, bytes], None]


def call_streaming(target: ChannelTarget, req: ImageRequest, *, timeout: float,
                   emit: Emit) -> tuple[ImagesResponse, int]:
    """Send a streamed request (``stream: true``) to a channel whose adapter streams; hand each image event to
    ``emit`` as the provider sends it; return the completed images and their summed usage, and the provider's
    latency. A provider that answers whole (it ignored ``stream``) is read as ``call`` reads it, no event emitted.

    Raises what ``call`` raises; an ``error`` event mid-stream is read as the provider's error, and whatever ``emit``
    raises goes through."""
    adapter = get_adapter(target.kind)
    upstream = adapter.build_request(req, target)
    secrets = (*upstream.secrets(), target.api_key, urlsplit(target.base_url).netloc)
    images: list[ImageData] = []
    usages: list[JSONDict] = []

    def on_event(data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            raise UpstreamError("The provider sent a malformed event.", channel_fault=True) from None
        if not isinstance(event, dict):
            raise UpstreamError("The provider sent a malformed event.", channel_fault=True)
        if event.get("error"):
            raise mask_error(adapter.parse_error(UpstreamResponse(502, {}, data), target), *secrets)
        kind = str(event.get("type", ""))
        if kind.endswith(".completed"):
            if not isinstance(event.get("b64_json"), str):
                raise UpstreamError("The provider sent a completed event without its image.", channel_fault=True)
            images.append(ImageData(b64_json=event["b64_json"]))
            if isinstance(event.get("usage"), dict):
                usages.append(event["usage"])
        elif not kind.endswith(".partial_image"):
            return  # an event the client's SDK would not know
        emit(event, data)

    resp = http.send_events(upstream, timeout=timeout, connect_timeout=target.connect_timeout, on_event=on_event)
    if resp.status >= 400:
        raise mask_error(adapter.parse_error(resp, target), *secrets)
    if resp.content:
        result = adapter.parse_response(resp, req, target)
        if isinstance(result, ImagesResponse):
            return result, resp.latency_ms
        raise UpstreamError("The provider answered a stream with a task to poll.", channel_fault=True)
    extra = {"usage": usage_summed(usages)} if usages else {}
    return ImagesResponse(int(time.time()), images, extra), resp.latency_ms
