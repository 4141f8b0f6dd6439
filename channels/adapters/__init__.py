"""The adapter registry: one line per provider. ``Channel.kind`` choices come from it."""

from __future__ import annotations

from functools import cache
from urllib.parse import urlsplit

from django.utils.module_loading import import_string

from channels.adapters.base import Adapter, ChannelTarget
from gateway.errors import mask_secrets
from gateway.schemas import ImageRequest, ImagesResponse

ADAPTERS: dict[str, tuple[str, str]] = {
    "openai": ("OpenAI-compatible", "channels.adapters.openai.OpenAICompatibleAdapter"),
    "sd-webui": ("Stable Diffusion web UI (AUTOMATIC1111 / Forge)", "channels.adapters.sd_webui.SDWebUIAdapter"),
    "placeholder": ("Placeholder (demo and tests; no real images)", "channels.adapters.placeholder.PlaceholderAdapter"),
}
KIND_CHOICES = [(kind, label) for kind, (label, _path) in ADAPTERS.items()]


@cache
def get_adapter(kind: str) -> Adapter:
    """The adapter for a channel kind. Raises ``KeyError`` for a kind that is not registered."""
    adapter: Adapter = import_string(ADAPTERS[kind][1])()
    return adapter


def call(target: ChannelTarget, req: ImageRequest, *, timeout: float) -> tuple[ImagesResponse, int]:
    """Send ``req`` to one channel; return OpenAI's shape and the provider's latency in ms.

    Raises a ``GatewayError``: the adapter's reading of a provider error, or the transport's for a network fault.
    """
    adapter = get_adapter(target.kind)
    upstream = adapter.build_request(req, target)
    resp = adapter.transport(upstream, timeout=timeout, connect_timeout=target.connect_timeout)
    if resp.status >= 400:
        error = adapter.parse_error(resp, target)
        # Provider messages reach clients and logs: never with our key or the provider's address in them.
        error.message = mask_secrets(error.message, target.api_key, urlsplit(target.base_url).netloc)
        raise error
    return adapter.parse_response(resp, req), resp.latency_ms
