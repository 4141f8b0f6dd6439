"""A request's usage row as it is built: what the client asked, every channel tried, how it ended. Where it is
written: ``usage_sql.py`` (the statements) and ``usage_writers.py`` (after the answer)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from django.conf import settings
from django.utils import timezone

from gateway.billing import holds_for
from gateway.models import ApiToken, Price, UsageLog
from gateway.pricing import Tokens, charge_micros, tokens_from_usage, unit_prices, with_multiplier
from openopen8.core.errors import GatewayError
from openopen8.core.schemas import ImageRequest


@cache
def _prompt_key() -> bytes:
    return hashlib.sha256(f"openopen8 prompt hash\0{settings.SECRET_KEY}".encode()).digest()


def usage_new(*, token: ApiToken, endpoint: str, request_id: str) -> UsageLog:
    """An unsaved row with what is known before the body is read, the budgets its request holds among it."""
    log = UsageLog(token=token, endpoint=endpoint, request_id=request_id)
    holds_for(log, token)
    return log


def usage_body(log: UsageLog, body: Any) -> None:
    """What the body says before it is checked: the model, and the prompt as length and keyed hash unless the
    operator turned prompt logging on."""
    fields = body if isinstance(body, dict) else {}
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        log.prompt_length = len(prompt)
        # Keyed with the secret: a plain hash would let anyone with the table confirm a guessed prompt.
        log.prompt_sha256 = hmac.new(_prompt_key(), prompt.encode(), hashlib.sha256).hexdigest()
        log.prompt = prompt if settings.OPENOPEN8_LOG_PROMPTS else ""
    model = fields.get("model")
    log.model = model[:100] if isinstance(model, str) else ""


def usage_describe(log: UsageLog, req: ImageRequest) -> None:
    log.model, log.n, log.size = req.model, req.n, req.size or ""
    log.quality, log.response_format = req.quality or "", req.response_format


@dataclass(frozen=True)
class Attempt:
    """One channel tried for a request: which, how long it took, and how it failed if it did (the error's status,
    code and message, not the exception, which would keep the failed attempt's frames alive with the row)."""

    channel_id: int
    name: str
    provider_model: str
    latency_ms: int
    provider_latency_ms: int | None = None
    failure: tuple[int, str | None, str] | None = None

    def to_record(self) -> dict[str, Any]:
        """The attempt as the usage row's ``attempts`` list keeps it."""
        if self.failure is None:
            return {"channel": self.channel_id, "name": self.name, "outcome": "ok", "latency_ms": self.latency_ms}
        status, code, message = self.failure
        return {"channel": self.channel_id, "name": self.name, "outcome": "error", "status": status, "code": code,
                "message": message, "latency_ms": self.latency_ms}


def usage_inputs(log: UsageLog, req: ImageRequest) -> None:
    """Record the size of the decoded input images."""
    log.input_bytes = sum(i.size for i in (*req.images, req.mask, req.markup) if i is not None)


def usage_price(log: UsageLog, row: Price | None, multiplier: Decimal) -> None:
    """The price row that applies and the rates it applied, kept on the row as they are now."""
    log.price, log.unit_prices = row, unit_prices(row)
    if row is not None and multiplier != 1:
        log.unit_prices["group_multiplier"] = str(multiplier)


def usage_succeed(log: UsageLog, *, images: int, cost_micros: int, tokens: Tokens | None) -> None:
    """The request delivered ``images`` at ``cost_micros`` (their price, or their tokens'), and no more; what the
    cost takes beyond the request's hold is recorded as its overrun."""
    log.images_returned, log.cost_micros = images, cost_micros
    log.overrun_micros = max(0, cost_micros - log.hold_micros) if log.hold_micros else 0
    if tokens is not None:
        (log.input_text_tokens, log.input_image_tokens, log.cached_input_tokens, log.output_image_tokens,
         log.output_text_tokens) = tokens.as_tuple()
    log.status, log.http_status = UsageLog.Status.SUCCESS, 200


def usage_delivered(log: UsageLog, *, row: Price | None, multiplier: Decimal, images: int, usage: Any,
                    size: str | None, quality: str | None) -> None:
    """The request delivered ``images``, with the provider's ``usage`` (or none): charged by the price row, by
    tokens where it prices them, times the group's multiplier."""
    tokens = tokens_from_usage(usage)
    charge = charge_micros(row, images=images, tokens=tokens, size=size, quality=quality)
    usage_succeed(log, images=images, cost_micros=with_multiplier(charge.micros, multiplier), tokens=tokens)


def usage_departed(log: UsageLog, when: str) -> None:
    """The client went away without its answer: recorded once, with when it was seen gone; its images cost nothing
    unless OPENOPEN8_CHARGE_DEPARTED_CLIENTS (the default: the provider charged for them)."""
    if not log.client_gone:
        log.client_gone, log.client_gone_at = when, timezone.now()
    if not settings.OPENOPEN8_CHARGE_DEPARTED_CLIENTS:
        log.cost_micros = 0


def usage_close(log: UsageLog, *, attempts: list[Attempt], latency_ms: int) -> int:
    """Record the channels tried (the last one answered, or failed last) and the end; return the budget hold the
    pending row took, of which the completion gives back what the cost does not use."""
    log.attempts = [attempt.to_record() for attempt in attempts]
    if attempts:
        last = attempts[-1]
        log.channel_id, log.provider_model, log.provider_latency_ms = (last.channel_id, last.provider_model,
                                                                       last.provider_latency_ms)
    log.latency_ms, log.completed_at = latency_ms, timezone.now()
    held, log.reserved_micros = log.reserved_micros, 0
    return held


def usage_replayed(log: UsageLog, first: str, *, status: int) -> None:
    """The request repeated the answer of request ``first`` (its Idempotency-Key): no images made, nothing charged."""
    log.status, log.http_status, log.replay_of = UsageLog.Status.SUCCESS, status, first


def usage_fail(log: UsageLog, error: GatewayError) -> None:
    log.status, log.http_status = UsageLog.Status.ERROR, error.status
    log.error_type, log.error_code, log.error_message = error.type, error.code or "", error.message[:2000]
