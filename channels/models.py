"""Upstream channels: one provider endpoint with its own key, the models it serves, and its routing weight."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models

from channels.adapters import KIND_CHOICES, get_adapter
from channels.adapters.base import ChannelTarget

ENDPOINTS = ("generations", "edits", "variations")
ALL_ENDPOINTS = ",".join(ENDPOINTS)


def split_names(text: str) -> list[str]:
    """Model names from a comma- or line-separated list as operators type it."""
    return [name.strip() for name in text.replace("\n", ",").split(",") if name.strip()]


class Channel(models.Model):
    name = models.CharField(max_length=100)
    kind = models.CharField("type", max_length=32, choices=KIND_CHOICES)
    base_url = models.CharField("base URL", max_length=500, blank=True,
                                help_text="For OpenAI-compatible providers, the URL ending in /v1.")
    api_key = models.CharField("API key", max_length=500, blank=True,
                               help_text="For sd-webui with --api-auth, user:password.")
    served_models = models.TextField("models",
                                     help_text="Model names clients may ask for, comma-separated; * serves any model.")
    model_map = models.JSONField(
        default=dict, blank=True,
        help_text='Client model name → provider model name, e.g. {"dall-e-3": "my-deployment"}.')
    endpoints = models.CharField(max_length=100, default=ALL_ENDPOINTS,
                                 help_text="What it serves, comma-separated: generations, edits, variations.")
    priority = models.IntegerField(default=0, help_text="Higher is tried first.")
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)],
                                         help_text="Share of traffic among channels of the same priority.")
    enabled = models.BooleanField(default=True)
    timeout = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.1)],
                                help_text="Seconds to wait for the provider; empty uses OPENOPEN8_UPSTREAM_TIMEOUT.")
    config = models.JSONField(default=dict, blank=True, help_text="Settings for this channel type.")
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField("last latency (ms)", null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-priority", "name"]

    def __str__(self) -> str:
        return self.name

    def model_names(self) -> list[str]:
        return split_names(self.served_models)

    def serves(self, model: str) -> bool:
        names = self.model_names()
        return "*" in names or model in names or model in self.model_map

    @property
    def masked_key(self) -> str:
        return f"…{self.api_key[-4:]}" if len(self.api_key) > 8 else ("set" if self.api_key else "")

    def clean(self) -> None:
        errors: dict[str, Any] = {}
        if self.kind in dict(KIND_CHOICES):
            adapter = get_adapter(self.kind)
            try:
                adapter.parse_config(self.config or {})
            except ValueError as e:
                errors["config"] = str(e)
            if adapter.needs_base_url and not self.base_url.startswith(("http://", "https://")):
                errors["base_url"] = "Enter the provider's http(s) URL."
            declared = split_names(self.endpoints)
            unknown = [e for e in declared if e not in adapter.endpoints]
            if unknown or not declared:
                errors["endpoints"] = (f"Choose among {', '.join(sorted(adapter.endpoints))}"
                                       + (f"; this type cannot serve {', '.join(unknown)}." if unknown else "."))
        if not isinstance(self.model_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.model_map.items()):
            errors["model_map"] = 'Enter an object of model names, e.g. {"dall-e-3": "provider-model"}.'
        if not self.model_names() and not self.model_map:
            errors["served_models"] = "Name at least one model this channel serves."
        if errors:
            raise ValidationError(errors)

    def to_target(self) -> ChannelTarget:
        """The frozen value adapters get. Raises ``ValueError`` if the stored config no longer parses."""
        adapter = get_adapter(self.kind)
        return ChannelTarget(id=self.pk, name=self.name, kind=self.kind, base_url=self.base_url, api_key=self.api_key,
                             config=adapter.parse_config(self.config or {}), model_map=self.model_map,
                             timeout=self.timeout, weight=self.weight, priority=self.priority,
                             endpoints=frozenset(split_names(self.endpoints)) & adapter.endpoints,
                             max_input_images=adapter.max_input_images, file_fields=adapter.file_fields)
