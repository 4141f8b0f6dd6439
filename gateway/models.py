"""API tokens, prices and usage logs."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone

from channels.models import Channel, split_names

KEY_PREFIX_LENGTH = 8


def to_micros(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value())


def from_micros(micros: int) -> Decimal:
    return (Decimal(micros) / 1_000_000).quantize(Decimal("0.000001"))


def hash_key(key: str) -> str:
    """HMAC-SHA256 of an API key under the secret key: a database leak alone does not reveal usable keys."""
    return hmac.new(settings.SECRET_KEY.encode(), key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    return key[3:3 + KEY_PREFIX_LENGTH]


class ApiToken(models.Model):
    name = models.CharField(max_length=100)
    key_prefix = models.CharField(max_length=KEY_PREFIX_LENGTH, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    enabled = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    # Money is kept in whole micro-dollars: SQL arithmetic on integers is exact on every database.
    budget_micros = models.BigIntegerField("budget (µUSD)", null=True, blank=True, help_text="Empty means unlimited.")
    # Counted against the budget, held before each request. A token without a budget keeps no running total here:
    # what it spent is the sum of its usage rows (the admin shows that).
    spent_micros = models.BigIntegerField("spent against the budget (µUSD)", default=0)
    allowed_models = models.TextField(blank=True, help_text="Comma-separated; empty allows every model.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Empty means no limit.")
    max_in_flight = models.PositiveIntegerField("requests in flight", null=True, blank=True,
                                                help_text="Requests running at once; empty means no limit.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    # DRF treats the authenticated token as the request's user.
    is_authenticated = True

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} (sk-{self.key_prefix}…)"

    @property
    def budget(self) -> Decimal | None:
        return None if self.budget_micros is None else from_micros(self.budget_micros)

    @property
    def spent(self) -> Decimal:
        return from_micros(self.spent_micros)

    def set_key(self, key: str) -> None:
        self.key_prefix, self.key_hash = key_prefix(key), hash_key(key)

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_key(key))

    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def allows(self, model: str) -> bool:
        names = split_names(self.allowed_models)
        return not names or model in names

    def end_user_id(self) -> str:
        """A stable id for this token that providers may record (a channel's ``end_user``: token); it names
        neither the key nor the token's row."""
        return "oo8-" + hmac.new(settings.SECRET_KEY.encode(), f"end-user:{self.pk}".encode(),
                                 hashlib.sha256).hexdigest()[:32]


class Price(models.Model):
    """USD per image. An empty size or quality matches any; the most specific row wins."""

    model = models.CharField(max_length=100, db_index=True)
    size = models.CharField(max_length=20, blank=True)
    quality = models.CharField(max_length=20, blank=True)
    usd_per_image = models.DecimalField("USD per image", max_digits=12, decimal_places=6)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "size", "quality"], name="unique_price")]
        ordering = ["model", "size", "quality"]

    def __str__(self) -> str:
        return f"{self.model} {self.size or 'any size'} {self.quality or 'any quality'}: ${self.usd_per_image}"


class Counter(models.Model):
    """A count in one fixed time window (requests or images per minute), shared by every worker and node when the
    database holds the shared state."""

    key = models.CharField(max_length=100)
    window = models.BigIntegerField(help_text="Start of the window, in Unix seconds.")
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "window"], name="unique_counter_window")]


class Lease(models.Model):
    """One request in flight under a concurrency limit; it lapses at ``expires_at`` if its worker dies."""

    key = models.CharField(max_length=100, db_index=True)
    holder = models.CharField(max_length=40, unique=True)
    expires_at = models.FloatField(db_index=True)


class UsageLog(models.Model):
    """One row per client request: written as pending before any provider is called, completed after."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SUCCESS = "success"
        ERROR = "error"

    class ClientGone(models.TextChoices):
        STAYED = "", "stayed for the answer"
        BEFORE = "before_provider", "left before the provider answered"
        AFTER = "after_provider", "left after the provider answered, before it had the answer"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    request_id = models.CharField(max_length=40, unique=True)
    token = models.ForeignKey(ApiToken, null=True, on_delete=models.SET_NULL, related_name="usage")
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=100, blank=True, db_index=True)
    channel = models.ForeignKey(Channel, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage",
                                help_text="The channel that answered last.")
    provider_model = models.CharField(max_length=200, blank=True)
    attempts = models.JSONField(default=list, blank=True,
                                help_text="Every channel tried: id, name, outcome, latency.")
    n = models.PositiveIntegerField(null=True, blank=True)
    input_images = models.PositiveIntegerField(default=0, help_text="Image files that came in (edits, variations).")
    input_bytes = models.PositiveBigIntegerField(default=0)
    images_returned = models.PositiveIntegerField(default=0)
    size = models.CharField(max_length=20, blank=True)
    quality = models.CharField(max_length=20, blank=True)
    response_format = models.CharField(max_length=10, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_type = models.CharField(max_length=50, blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    error_message = models.TextField(blank=True)
    cost_micros = models.BigIntegerField("cost (µUSD)", default=0)
    reserved_micros = models.BigIntegerField("reserved (µUSD)", default=0,
                                             help_text="Held from the budget while the request runs.")
    latency_ms = models.PositiveIntegerField("total latency (ms)", null=True, blank=True)
    provider_latency_ms = models.PositiveIntegerField("provider latency (ms)", null=True, blank=True)
    prompt_length = models.PositiveIntegerField(null=True, blank=True)
    prompt_sha256 = models.CharField(max_length=64, blank=True)
    prompt = models.TextField(blank=True, help_text="Kept only with OPENOPEN8_LOG_PROMPTS on.")
    client_gone = models.CharField("client went away", max_length=20, blank=True, choices=ClientGone.choices,
                                   default=ClientGone.STAYED)
    client_gone_at = models.DateTimeField("client seen gone at", null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.model} {self.status}"

    @property
    def cost(self) -> Decimal:
        return from_micros(self.cost_micros)
