"""Upstream channels: one provider endpoint with its own key, the models it serves, and its routing weight."""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from channels.adapters import ADAPTERS, get_adapter
from channels.adapters.base import ChannelTarget
from openopen8.core.crypto import EncryptedTextField

ENDPOINTS = ("generations", "edits", "variations")
ALL_ENDPOINTS = ",".join(ENDPOINTS)


def key_fingerprint(key: str) -> str:
    """A short, non-reversible name for a key, to remember which one a provider rejected."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def split_names(text: str) -> list[str]:
    """Model names from a comma- or line-separated list as operators type it."""
    return [name.strip() for name in text.replace("\n", ",").split(",") if name.strip()]


# Keys are used in turn; each process keeps its own turn (fair over time, no shared write per request).
_turn = itertools.count()


class Circuit(models.Model):
    """A channel's circuit breaker, when the database holds the shared state."""

    channel = models.OneToOneField("Channel", on_delete=models.CASCADE, primary_key=True, related_name="circuit")
    failures = models.PositiveIntegerField(default=0, help_text="Consecutive channel faults.")
    trips = models.PositiveIntegerField(default=0, help_text="Times opened since it last worked.")
    open_until = models.FloatField(null=True, blank=True)
    probe_until = models.FloatField(null=True, blank=True)


class Channel(models.Model):
    name = models.CharField(_("name"), max_length=100)
    # A type from the adapter registry (channels/adapters/__init__.py). The choices are the admin form's and clean()
    # checks them, so adding a provider needs no migration.
    kind = models.CharField(_("type"), max_length=32)
    base_url = models.CharField(_("base URL"), max_length=500, blank=True,
                                help_text=_("For OpenAI-compatible providers, the URL ending in /v1."))
    api_key = EncryptedTextField(
        _("API keys"), blank=True,
        help_text=_("One per line; used in turn. For sd-webui with --api-auth, user:password."))
    disabled_keys = models.JSONField(_("disabled keys"), default=dict, blank=True,
                                     help_text=_("Keys the provider rejected, by fingerprint, with the reason."))
    disabled_reason = models.TextField(_("disabled reason"), blank=True,
                                       help_text=_("Why the gateway disabled this channel, if it did."))
    served_models = models.TextField(
        _("models"), help_text=_("Model names clients may ask for, comma-separated; * serves any model."))
    model_map = models.JSONField(
        _("model map"), default=dict, blank=True,
        help_text=_('Client model name → provider model name, e.g. {"dall-e-3": "my-deployment"}.'))
    endpoints = models.CharField(_("endpoints"), max_length=100, default=ALL_ENDPOINTS,
                                 help_text=_("What it serves, comma-separated: generations, edits, variations."))
    priority = models.IntegerField(_("priority"), default=0, help_text=_("Higher is tried first."))
    weight = models.PositiveIntegerField(_("weight"), default=1, validators=[MinValueValidator(1)],
                                         help_text=_("Share of traffic among channels of the same priority."))
    enabled = models.BooleanField(_("enabled"), default=True)
    timeout = models.FloatField(_("read timeout"), null=True, blank=True, validators=[MinValueValidator(0.1)],
                                help_text=_("Seconds to wait for the provider; empty uses OPENOPEN8_UPSTREAM_TIMEOUT."))
    connect_timeout = models.FloatField(_("connect timeout"), null=True, blank=True,
                                        validators=[MinValueValidator(0.1)],
                                        help_text=_("Seconds to wait for a connection; empty uses "
                                                    "OPENOPEN8_CONNECT_TIMEOUT."))
    safe_to_retry = models.BooleanField(_("safe to retry"), default=False,
                                        help_text=_("Retry elsewhere after a read timeout or a dropped answer, when "
                                                    "the provider may already have made (and billed) the image."))
    images_per_minute = models.PositiveIntegerField(_("images per minute"), null=True, blank=True,
                                                    help_text=_("Empty means no limit."))
    max_in_flight = models.PositiveIntegerField(_("requests in flight"), null=True, blank=True,
                                                help_text=_("Requests running at once; empty means no limit."))
    class EndUser(models.TextChoices):
        CLIENT = "client", _("the client's own user / safety_identifier")
        TOKEN = "token", _("a stable hash of the client's API key")
        NONE = "none", _("nothing")

    end_user = models.CharField(
        _("end-user id sent"), max_length=8, choices=EndUser.choices, default=EndUser.CLIENT,
        help_text=_("What goes to the provider as user / safety_identifier, which it records against your account."))
    config = models.JSONField(_("config"), default=dict, blank=True, help_text=_("Settings for this channel type."))
    demo = models.BooleanField(_("demo"), default=False,
                               help_text=_("The demo channel `make run` made: it never serves a key with a budget (or "
                                           "in a group with one). Delete it once real channels are set up."))
    last_error = models.TextField(_("last error"), blank=True)
    last_error_at = models.DateTimeField(_("last error at"), null=True, blank=True)
    last_used_at = models.DateTimeField(_("last used at"), null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField(_("last latency (ms)"), null=True, blank=True)
    last_test_at = models.DateTimeField(_("last test at"), null=True, blank=True)
    last_test_ok = models.BooleanField(_("last test ok"), null=True, blank=True)
    last_test_message = models.TextField(_("last test message"), blank=True)
    last_test_latency_ms = models.PositiveIntegerField(_("last test latency (ms)"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-priority", "name"]
        verbose_name, verbose_name_plural = _("channel"), _("channels")

    def __str__(self) -> str:
        return self.name

    @property
    def kind_label(self) -> str:
        """The type's name as the registry gives it (the raw type for one no longer registered)."""
        return ADAPTERS[self.kind][0] if self.kind in ADAPTERS else self.kind

    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_key.splitlines() if k.strip()]

    def usable_keys(self) -> list[str]:
        """The keys the provider has not rejected."""
        return [k for k in self.keys() if key_fingerprint(k) not in self.disabled_keys]

    def model_names(self) -> list[str]:
        return split_names(self.served_models)

    def serves(self, model: str) -> bool:
        names = self.model_names()
        return "*" in names or model in names or model in self.model_map

    @property
    def masked_key(self) -> str:
        """Each key as its last four characters; set-aside keys marked."""
        shown = [(f"…{k[-4:]}" if len(k) > 8 else "set")
                 + (" (set aside)" if key_fingerprint(k) in self.disabled_keys else "") for k in self.keys()]
        return ", ".join(shown)

    def clean(self) -> None:
        errors: dict[str, Any] = {}
        if self.kind not in ADAPTERS:
            errors["kind"] = gettext("Choose a channel type: %(types)s.") % {"types": ", ".join(ADAPTERS)}
        else:
            adapter = get_adapter(self.kind)
            if self.config is not None and not isinstance(self.config, dict):
                errors["config"] = gettext("The config must be a JSON object of settings, such as {\"steps\": 30}; "
                                           "%(config)s is not one.") % {"config": json.dumps(self.config)[:60]}
            else:
                try:
                    adapter.parse_config(self.config or {})
                except (ValueError, TypeError) as e:
                    errors["config"] = str(e)
            if adapter.needs_base_url and not self.base_url.startswith(("http://", "https://")):
                errors["base_url"] = gettext("Enter the provider's http(s) URL.")
            declared = split_names(self.endpoints)
            unknown = [e for e in declared if e not in adapter.endpoints]
            if unknown or not declared:
                choices = {"endpoints": ", ".join(sorted(adapter.endpoints)), "unknown": ", ".join(unknown)}
                errors["endpoints"] = (gettext("Choose among %(endpoints)s; this type cannot serve %(unknown)s.")
                                       if unknown else gettext("Choose among %(endpoints)s.")) % choices
        if not isinstance(self.model_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.model_map.items()):
            errors["model_map"] = gettext('Enter an object of model names, e.g. {"dall-e-3": "provider-model"}.')
        if not self.model_names() and not self.model_map:
            errors["served_models"] = gettext("Name at least one model this channel serves.")
        if errors:
            raise ValidationError(errors)

    def to_target(self, *, key: str | None = None) -> ChannelTarget | None:
        """The frozen value adapters get, with ``key`` or else one usable key chosen in turn; ``None`` when every
        key is set aside. Raises ``ValueError`` if the stored config no longer parses."""
        adapter = get_adapter(self.kind)
        keys = self.usable_keys()
        if key is None and self.keys() and not keys:
            return None
        if key is None:
            key = keys[next(_turn) % len(keys)] if keys else ""
        return ChannelTarget(id=self.pk, name=self.name, kind=self.kind, base_url=self.base_url,
                             api_key=key, spare_keys=max(len(keys) - 1, 0),
                             connect_timeout=self.connect_timeout, safe_to_retry=self.safe_to_retry,
                             end_user=self.end_user, demo=self.demo,
                             images_per_minute=self.images_per_minute, max_in_flight=self.max_in_flight,
                             config=adapter.parse_config(self.config or {}), model_map=self.model_map,
                             timeout=self.timeout, weight=self.weight, priority=self.priority,
                             endpoints=frozenset(split_names(self.endpoints)) & adapter.endpoints,
                             max_input_images=adapter.max_input_images, file_fields=adapter.file_fields)
