"""API tokens, prices and usage logs."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from channels.models import Channel, split_names
from openopen8.core.crypto import EncryptedTextField

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


EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class Period(models.TextChoices):
    ONCE = "", _("one-off")
    DAY = "day", _("daily (UTC)")
    WEEK = "week", _("weekly (UTC, from Monday)")
    MONTH = "month", _("monthly (UTC, from the 1st)")
    ANNIVERSARY = "anniversary", _("monthly (from the day it was created)")


def period_key(period: str, now: datetime, created: datetime | None) -> int:
    """The start, in Unix seconds, of the budget period ``now`` falls in (0 for a one-off budget): what is spent
    counts against the period whose key it was held under, and starts again from 0 under a new key."""
    now = now.astimezone(UTC)
    if period == Period.DAY:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == Period.WEEK:
        start = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == Period.MONTH:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    elif period == Period.ANNIVERSARY:
        born = (created or EPOCH).astimezone(UTC)
        start = _anniversary(born, now.year, now.month)
        if start > now:
            start = _anniversary(born, now.year - (now.month == 1), 12 if now.month == 1 else now.month - 1)
    else:
        return 0
    return int(start.timestamp())


def _anniversary(born: datetime, year: int, month: int) -> datetime:
    """The creation's day and time of day in that month, on its last day when the month is shorter."""
    day = min(born.day, calendar.monthrange(year, month)[1])
    return born.replace(year=year, month=month, day=day)


class Budgeted(models.Model):
    """A budget that is one-off or renews: ``spent_micros`` counts the period ``period_key`` names."""

    # Money is kept in whole micro-dollars: SQL arithmetic on integers is exact on every database.
    budget_micros = models.BigIntegerField(_("budget (µUSD)"), null=True, blank=True,
                                           help_text=_("Empty means unlimited."))
    budget_period = models.CharField(_("budget renews"), max_length=12, blank=True, choices=Period.choices,
                                     default=Period.ONCE)
    # Counted against the budget, held before each request, in the period this key names.
    spent_micros = models.BigIntegerField(_("spent against the budget (µUSD)"), default=0)
    period_key = models.BigIntegerField(_("period key"), default=0, editable=False)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        abstract = True

    @property
    def budget(self) -> Decimal | None:
        return None if self.budget_micros is None else from_micros(self.budget_micros)

    def current_period(self, now: datetime | None = None) -> int:
        return period_key(self.budget_period, now or timezone.now(), self.created_at)

    def spent_this_period(self, now: datetime | None = None) -> int:
        """What was spent in the period now running: nothing yet when the stored one has ended."""
        return self.spent_micros if self.period_key >= self.current_period(now) else 0

    def period_ends(self, now: datetime | None = None) -> datetime | None:
        """When the running period ends (``None`` for a one-off budget)."""
        now = now or timezone.now()
        start = self.current_period(now)
        if not start:
            return None
        probe = datetime.fromtimestamp(start, UTC) + timedelta(days=1)
        while self.current_period(probe) == start:
            probe += timedelta(days=1)
        return datetime.fromtimestamp(self.current_period(probe), UTC)


class TokenGroup(Budgeted):
    """A team or customer: one budget for all its tokens together, and a price multiplier (a reseller's margin)."""

    name = models.CharField(_("name"), max_length=100, unique=True)
    multiplier = models.DecimalField(_("price multiplier"), max_digits=8, decimal_places=4, default=Decimal(1),
                                     help_text=_("Costs of its tokens' requests are multiplied by this."))

    class Meta:
        verbose_name, verbose_name_plural = _("token group"), _("token groups")

    def __str__(self) -> str:
        return self.name


class ApiToken(Budgeted):
    name = models.CharField(_("name"), max_length=100)
    key_prefix = models.CharField(_("key prefix"), max_length=KEY_PREFIX_LENGTH, db_index=True, editable=False)
    key_hash = models.CharField(_("key hash"), max_length=64, editable=False)
    enabled = models.BooleanField(_("enabled"), default=True)
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True)
    # A token without a budget keeps no running total in spent_micros: what it spent is the sum of its usage rows.
    group = models.ForeignKey(TokenGroup, verbose_name=_("group"), null=True, blank=True, on_delete=models.PROTECT,
                              related_name="tokens")
    allowed_models = models.TextField(_("allowed models"), blank=True,
                                      help_text=_("Comma-separated; empty allows every model."))
    requests_per_minute = models.PositiveIntegerField(_("requests per minute"), null=True, blank=True,
                                                      help_text=_("Empty means no limit."))
    max_in_flight = models.PositiveIntegerField(_("requests in flight"), null=True, blank=True,
                                                help_text=_("Requests running at once; empty means no limit."))
    max_queued_jobs = models.PositiveIntegerField(_("jobs waiting"), null=True, blank=True,
                                                  help_text=_("Image jobs queued or running at once; empty means "
                                                              "no limit."))
    last_used_at = models.DateTimeField(_("last used at"), null=True, blank=True)
    webhook_secret = EncryptedTextField(_("webhook secret"), blank=True, editable=False,
                                        help_text=_("Signs this key's job webhooks; made at first use."))

    # DRF treats the authenticated token as the request's user.
    is_authenticated = True

    class Meta:
        verbose_name, verbose_name_plural = _("API token"), _("API tokens")

    def __str__(self) -> str:
        return f"{self.name} (sk-{self.key_prefix}…)"

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


def _rate(verbose_name: Any) -> Any:
    return models.DecimalField(verbose_name, max_digits=12, decimal_places=6, null=True, blank=True)


class Price(models.Model):
    """USD per image, or per token of each kind (gateway/pricing.py). The model is a name or a ``*`` pattern; an
    empty size or quality matches any; the most specific row in effect when a request starts prices it."""

    model = models.CharField(_("model"), max_length=100, db_index=True,
                             help_text=_("A model name, or a pattern: gpt-image-2.6*"))
    size = models.CharField(_("size"), max_length=20, blank=True)
    quality = models.CharField(_("quality"), max_length=20, blank=True)
    usd_per_image = models.DecimalField(_("USD per image"), max_digits=12, decimal_places=6, default=Decimal(0))
    usd_per_1m_text_input = _rate(_("USD per 1M text input tokens"))
    usd_per_1m_image_input = _rate(_("USD per 1M image input tokens"))
    usd_per_1m_cached_input = _rate(_("USD per 1M cached input tokens"))
    usd_per_1m_image_output = _rate(_("USD per 1M image output tokens"))
    usd_per_1m_text_output = _rate(_("USD per 1M text output tokens"))
    ceiling_usd_per_image = models.DecimalField(
        _("hold per image (USD)"), max_digits=12, decimal_places=6, null=True, blank=True,
        help_text=_("What a token-priced request holds per image before the provider answers; empty: OpenAI's "
                    "output-token table at the image output rate."))
    effective_from = models.DateTimeField(_("effective from"), default=EPOCH,
                                          help_text=_("Requests started from then on use this row."))

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "size", "quality", "effective_from"],
                                               name="unique_price")]
        ordering = ["model", "size", "quality", "-effective_from"]
        verbose_name, verbose_name_plural = _("price"), _("prices")

    def __str__(self) -> str:
        what = "by tokens" if self.usd_per_1m_image_output is not None else f"${self.usd_per_image}"
        return f"{self.model} {self.size or 'any size'} {self.quality or 'any quality'}: {what}"


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
        PENDING = "pending", _("pending")
        SUCCESS = "success", _("success")
        ERROR = "error", _("error")

    class ClientGone(models.TextChoices):
        STAYED = "", _("stayed for the answer")
        BEFORE = "before_provider", _("left before the provider answered")
        AFTER = "after_provider", _("left after the provider answered, before it had the answer")

    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    request_id = models.CharField(_("request id"), max_length=40, unique=True)
    token = models.ForeignKey(ApiToken, verbose_name=_("token"), null=True, on_delete=models.SET_NULL,
                              related_name="usage")
    endpoint = models.CharField(_("endpoint"), max_length=32)
    model = models.CharField(_("model"), max_length=100, blank=True, db_index=True)
    channel = models.ForeignKey(Channel, verbose_name=_("channel"), null=True, blank=True, on_delete=models.SET_NULL,
                                related_name="usage",
                                help_text=_("The channel that answered last."))
    provider_model = models.CharField(_("provider model"), max_length=200, blank=True)
    attempts = models.JSONField(_("attempts"), default=list, blank=True,
                                help_text=_("Every channel tried: id, name, outcome, latency."))
    n = models.PositiveIntegerField(_("n"), null=True, blank=True)
    input_images = models.PositiveIntegerField(_("input images"), default=0,
                                               help_text=_("Image files that came in (edits, variations)."))
    input_bytes = models.PositiveBigIntegerField(_("input bytes"), default=0)
    images_returned = models.PositiveIntegerField(_("images returned"), default=0)
    size = models.CharField(_("size"), max_length=20, blank=True)
    quality = models.CharField(_("quality"), max_length=20, blank=True)
    response_format = models.CharField(_("response format"), max_length=10, blank=True)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    http_status = models.PositiveSmallIntegerField(_("http status"), null=True, blank=True)
    error_type = models.CharField(_("error type"), max_length=50, blank=True)
    error_code = models.CharField(_("error code"), max_length=50, blank=True)
    error_message = models.TextField(_("error message"), blank=True)
    cost_micros = models.BigIntegerField(_("cost (µUSD)"), default=0)
    reserved_micros = models.BigIntegerField(_("reserved (µUSD)"), default=0,
                                             help_text=_("Held from the budget while the request runs."))
    # The money as it was worked out: the hold taken (kept after the request ends), the part of the cost beyond it,
    # the price row and the rates it applied (a later change of the row rewrites nothing), and the token counts.
    hold_micros = models.BigIntegerField(_("held (µUSD)"), default=0)
    overrun_micros = models.BigIntegerField(_("cost beyond the hold (µUSD)"), default=0)
    price = models.ForeignKey(Price, verbose_name=_("price"), null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="usage")
    unit_prices = models.JSONField(_("unit prices"), default=dict, blank=True)
    input_text_tokens = models.PositiveIntegerField(_("input text tokens"), null=True, blank=True)
    input_image_tokens = models.PositiveIntegerField(_("input image tokens"), null=True, blank=True)
    cached_input_tokens = models.PositiveIntegerField(_("cached input tokens"), null=True, blank=True)
    output_image_tokens = models.PositiveIntegerField(_("output image tokens"), null=True, blank=True)
    output_text_tokens = models.PositiveIntegerField(_("output text tokens"), null=True, blank=True)
    # Which budgets the hold was counted against, by their period's key (empty: that budget was not held).
    budget_period = models.BigIntegerField(_("budget period"), null=True, blank=True, editable=False)
    group = models.ForeignKey(TokenGroup, verbose_name=_("group"), null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="usage")
    group_period = models.BigIntegerField(_("group period"), null=True, blank=True, editable=False)
    latency_ms = models.PositiveIntegerField(_("total latency (ms)"), null=True, blank=True)
    provider_latency_ms = models.PositiveIntegerField(_("provider latency (ms)"), null=True, blank=True)
    prompt_length = models.PositiveIntegerField(_("prompt length"), null=True, blank=True)
    prompt_sha256 = models.CharField(_("prompt sha256"), max_length=64, blank=True)
    prompt = models.TextField(_("prompt"), blank=True, help_text=_("Kept only with OPENOPEN8_LOG_PROMPTS on."))
    client_gone = models.CharField(_("client went away"), max_length=20, blank=True, choices=ClientGone.choices,
                                   default=ClientGone.STAYED)
    client_gone_at = models.DateTimeField(_("client seen gone at"), null=True, blank=True)
    replay_of = models.CharField(_("repeated the answer of"), max_length=40, blank=True,
                                 help_text=_("The request whose answer this one got again, by its Idempotency-Key."))
    job_id = models.CharField(_("job"), max_length=40, blank=True,
                              help_text=_("The image job this request was submitted as; its row completes when the "
                                          "job ends."))

    class Meta:
        ordering = ["-created_at"]
        verbose_name, verbose_name_plural = _("usage log"), _("usage logs")

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.model} {self.status}"

    @property
    def cost(self) -> Decimal:
        return from_micros(self.cost_micros)


class IdempotentRequest(models.Model):
    """An ``Idempotency-Key`` a token sent: a hash of the request it named and, once that request succeeded, its
    answer, which a repeat with the same key and content gets instead of new images (gateway/idempotency.py)."""

    token = models.ForeignKey(ApiToken, on_delete=models.CASCADE, related_name="idempotent_requests")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    request_id = models.CharField(max_length=40, help_text="The request that holds the key, or held it.")
    claimed_at = models.DateTimeField(default=timezone.now)
    answered_at = models.DateTimeField(null=True, blank=True, db_index=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    answer = models.TextField(blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["token", "key"], name="idempotency_key_per_token")]

    def __str__(self) -> str:
        return f"{self.key} ({self.request_id})"


class ImageJob(models.Model):
    """A request submitted with ``Prefer: respond-async``: checked and held against the budget at once (its usage
    row, pending until the job ends), run by a job runner (gateway/job_runner.py), polled by its key."""

    class Status(models.TextChoices):
        QUEUED = "queued", _("queued")
        RUNNING = "running", _("running")
        SUCCEEDED = "succeeded", _("succeeded")
        FAILED = "failed", _("failed")
        CANCELLED = "cancelled", _("cancelled")

    id = models.CharField(_("id"), primary_key=True, max_length=40, editable=False)
    token = models.ForeignKey(ApiToken, verbose_name=_("token"), on_delete=models.CASCADE, related_name="jobs")
    request_id = models.CharField(_("request id"), max_length=40, unique=True,
                                  help_text=_("The usage row of the request."))
    endpoint = models.CharField(_("endpoint"), max_length=32)
    model = models.CharField(_("model"), max_length=100)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    body = models.JSONField(_("body"), default=dict, help_text=_("The request's fields, as checked at submission."))
    inputs = models.JSONField(_("inputs"), default=list, blank=True,
                              help_text=_("Input images kept for the run (edits)."))
    files_url = models.CharField(_("files url"), max_length=500, blank=True,
                                 help_text=_("Where hosted images of the answer are served."))
    callback_url = models.CharField(_("callback url"), max_length=2000, blank=True,
                                    help_text=_("Sent the finished job, signed."))
    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    run_after = models.DateTimeField(_("run after"), null=True, blank=True,
                                     help_text=_("Waiting for a channel's limits until then."))
    heartbeat_at = models.DateTimeField(_("heartbeat at"), null=True, blank=True,
                                        help_text=_("Renewed by the runner while it runs."))
    provider_called_at = models.DateTimeField(_("provider called at"), null=True, blank=True,
                                              help_text=_("When a provider was first asked for this run's images."))
    called_channel = models.ForeignKey(Channel, verbose_name=_("called channel"), null=True, blank=True,
                                       on_delete=models.SET_NULL, related_name="+",
                                       help_text=_("The channel asked last in this run."))
    runs = models.PositiveIntegerField(_("runs"), default=0, help_text=_("Times a runner started the job."))
    cancel_requested = models.BooleanField(_("cancel requested"), default=False)
    result = models.JSONField(_("result"), null=True, blank=True)
    error = models.JSONField(_("error"), null=True, blank=True)
    error_status = models.PositiveSmallIntegerField(_("error status"), null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["token", "-created_at"], name="job_token_newest")]
        verbose_name, verbose_name_plural = _("image job"), _("image jobs")

    def __str__(self) -> str:
        return f"{self.id} {self.model} {self.status}"


class WebhookDelivery(models.Model):
    """One attempt to POST a finished job to its callback URL."""

    job = models.ForeignKey(ImageJob, verbose_name=_("job"), on_delete=models.CASCADE, related_name="deliveries")
    attempt = models.PositiveIntegerField(_("attempt"))
    at = models.DateTimeField(_("at"), default=timezone.now)
    status_code = models.PositiveSmallIntegerField(_("status code"), null=True, blank=True)
    error = models.CharField(_("error"), max_length=500, blank=True)
    duration_ms = models.PositiveIntegerField(_("duration ms"), default=0)
    delivered = models.BooleanField(_("delivered"), default=False)
    next_attempt_at = models.DateTimeField(_("next attempt at"), null=True, blank=True)

    class Meta:
        ordering = ["job", "at"]
        verbose_name, verbose_name_plural = _("webhook delivery"), _("webhook deliveries")

    def __str__(self) -> str:
        return f"{self.job_id} #{self.attempt} {self.status_code or self.error[:40]}"


class FailedAuthentication(models.Model):
    """Refused API keys, counted by what they begin with (never the key): an operator sees a client with a wrong,
    disabled or expired key, or someone guessing."""

    class Reason(models.TextChoices):
        UNKNOWN = "unknown", _("no such key")
        DISABLED = "disabled", _("the key is disabled")
        EXPIRED = "expired", _("the key has expired")
        MALFORMED = "malformed", _("not a Bearer sk- key")

    key_start = models.CharField(_("key begins"), max_length=16,
                                 help_text=_("sk- and the first 8 characters after it."))
    reason = models.CharField(_("reason"), max_length=10, choices=Reason.choices)
    token = models.ForeignKey(ApiToken, verbose_name=_("token"), null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    count = models.PositiveBigIntegerField(_("count"), default=0)
    first_at = models.DateTimeField(_("first at"), default=timezone.now)
    last_at = models.DateTimeField(_("last at"), default=timezone.now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key_start", "reason"], name="one_row_a_refused_key")]
        ordering = ["-last_at"]
        verbose_name, verbose_name_plural = _("refused key"), _("refused keys")

    def __str__(self) -> str:
        return f"{self.key_start}… {self.reason} ×{self.count}"


class UsageHour(models.Model):
    """Usage rows added up by the hour they started in (UTC), for the dashboard (gateway/rollup.py): each hour once in
    all (``dimension`` "all") and once by each model, channel, token and group (``key``: the model's name or the
    id), so a month's breakdown reads as many rows as there are hours times keys, however the keys combine. Ids, not
    foreign keys: a total outlives the channel or group it names."""

    hour = models.BigIntegerField(help_text="Start of the hour, in Unix seconds.")
    dimension = models.CharField(max_length=10)
    key = models.CharField(max_length=100, blank=True, help_text="Empty: no channel, token or group.")
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    pending = models.PositiveIntegerField(default=0)
    images = models.PositiveIntegerField(default=0)
    cost_micros = models.BigIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["dimension", "hour"], name="usagehour_dimension_hour")]


class RolledHour(models.Model):
    """An hour whose usage rows are added up in ``UsageHour``; one that still had pending rows is added up again."""

    hour = models.BigIntegerField(primary_key=True)
    pending = models.PositiveIntegerField(default=0)
    rolled_at = models.DateTimeField(default=timezone.now)


class Alert(models.Model):
    """Something an operator is told of as it happens (gateway/alerts.py): recorded once, whatever the delivery, and
    delivered to the alert webhook and mailbox when they are configured."""

    class Kind(models.TextChoices):
        CHANNEL_DISABLED = "channel.disabled", _("channel disabled")
        CIRCUIT_OPENED = "circuit.opened", _("circuit opened")
        BUDGET = "budget.threshold", _("budget threshold")

    # What makes it one alert: a budget's threshold is told once per period and budget.
    key = models.CharField(_("key"), max_length=200, unique=True, editable=False)
    kind = models.CharField(_("kind"), max_length=20, choices=Kind.choices)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)
    subject = models.CharField(_("subject"), max_length=200)
    text = models.TextField(_("text"))
    data = models.JSONField(_("data"), default=dict)
    attempts = models.PositiveIntegerField(_("delivery attempts"), default=0)
    webhook_status = models.PositiveSmallIntegerField(_("webhook answer"), null=True, blank=True)
    delivered_at = models.DateTimeField(_("webhook delivered"), null=True, blank=True)
    emailed_at = models.DateTimeField(_("mailed"), null=True, blank=True)
    last_error = models.CharField(_("last error"), max_length=300, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name, verbose_name_plural = _("alert"), _("alerts")

    def __str__(self) -> str:
        return self.subject
