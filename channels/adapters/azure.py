"""Azure OpenAI: deployment URLs with ``api-version``, the ``api-key`` header, and content-filter errors read as
refusals. The channel's base URL is the resource endpoint (``https://NAME.openai.azure.com``); the deployment is the
provider model name (map client models to deployments with the channel's model map)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from channels.adapters.base import ChannelTarget, classify, only_keys
from channels.adapters.openai import OpenAICompatibleAdapter
from openopen8.core.errors import ContentPolicyViolation, GatewayError
from openopen8.core.http import UpstreamRequest, UpstreamResponse
from openopen8.core.schemas import ImageRequest, ImagesResponse, JSONDict

DEFAULT_API_VERSION = "2025-04-01-preview"


@dataclass(frozen=True)
class Config:
    api_version: str = DEFAULT_API_VERSION
    response_format: str | None = None


def _filter_refusal(error: Any) -> bool:
    if not isinstance(error, dict):
        return False
    inner = error.get("inner_error") or error.get("innererror") or {}
    codes = {error.get("code"), inner.get("code") if isinstance(inner, dict) else None}
    return bool(codes & {"contentFilter", "content_filter", "ResponsibleAIPolicyViolation"})


class AzureAdapter(OpenAICompatibleAdapter):
    config_keys: ClassVar[frozenset[str]] = frozenset({"api_version", "response_format"})
    endpoints = frozenset({"generations", "edits"})  # Azure has no variations
    file_fields = frozenset({"image", "mask"})

    @staticmethod
    def parse_config(raw: JSONDict) -> Config:  # type: ignore[override]
        only_keys(raw, AzureAdapter.config_keys)
        version = raw.get("api_version", DEFAULT_API_VERSION)
        if not isinstance(version, str) or not version[:4].isdecimal():
            raise ValueError("api_version must look like 2025-04-01-preview")
        base = OpenAICompatibleAdapter.parse_config({k: v for k, v in raw.items() if k == "response_format"})
        return Config(api_version=version, response_format=base.response_format)

    def build_request(self, req: ImageRequest, target: ChannelTarget) -> UpstreamRequest:
        deployment = target.provider_model(req.model)
        upstream = super().build_request(req, target)
        url = (f"{target.base_url.rstrip('/')}/openai/deployments/{deployment}/images/{req.endpoint}"
               f"?api-version={target.config.api_version}")
        headers = {"api-key": target.api_key} if target.api_key else {}
        body = {k: v for k, v in (upstream.json or {}).items() if k != "model"} if upstream.json else None
        form = {k: v for k, v in (upstream.form or {}).items() if k != "model"} if upstream.form else None
        return replace(upstream, url=url, headers=headers, json=body, form=form)

    def build_probe(self, target: ChannelTarget) -> UpstreamRequest | None:
        headers = {"api-key": target.api_key} if target.api_key else {}
        return UpstreamRequest("GET", f"{target.base_url.rstrip('/')}/openai/models?api-version="
                               f"{target.config.api_version}", headers)

    def parse_response(self, resp: UpstreamResponse, req: ImageRequest,
                       target: ChannelTarget) -> ImagesResponse:
        body = resp.json()
        if isinstance(body, dict) and _filter_refusal(body.get("error")):
            raise ContentPolicyViolation(str(body["error"].get("message") or "The request was filtered."))
        return super().parse_response(resp, req, target)

    def parse_error(self, resp: UpstreamResponse, target: ChannelTarget) -> GatewayError:
        try:
            error = json.loads(resp.content).get("error")
        except (ValueError, AttributeError):
            error = None
        if _filter_refusal(error):
            return ContentPolicyViolation(str(error.get("message") or "Rejected by the content filter."))
        return super().parse_error(resp, target) if error is not None else classify(resp, f"HTTP {resp.status}")
