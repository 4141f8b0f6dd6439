"""What a request costs: the price row in effect, the hold it takes before a provider is called, and the charge
after, from the provider's token ``usage`` where the row is priced by tokens, else per delivered image.

Amounts are integer micro-dollars. A rate in USD per million tokens is exactly micro-dollars per token, so a token
charge is ``tokens x rate``, rounded up once per request. Pure functions of plain values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any, Protocol, TypeVar

from openopen8.core.schemas import JSONDict

# OpenAI's published image output tokens per image of the GPT image models (gpt-image-1, -1-mini, -1.5), by size and
# quality; other sizes scale by area from the square's. The hold of a token-priced row without a ceiling of its own.
OUTPUT_TOKENS = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 400, "medium": 1568, "high": 6208},
}
QUALITY_TIERS = {"standard": "medium", "hd": "high"}  # DALL·E-style names of the same tiers
# What one call's input may cost beyond its prompt: tokens allowed an input image (a high-fidelity square is 4,160
# on the models above), and the fixed overhead OpenAI adds to every prompt.
INPUT_IMAGE_TOKENS = 6240
PROMPT_OVERHEAD_TOKENS = 64


class PriceRow(Protocol):
    """A price row as these functions read it (gateway.models.Price)."""

    @property
    def model(self) -> str: ...

    @property
    def size(self) -> str: ...

    @property
    def quality(self) -> str: ...

    @property
    def usd_per_image(self) -> Decimal: ...

    @property
    def usd_per_1m_text_input(self) -> Decimal | None: ...

    @property
    def usd_per_1m_image_input(self) -> Decimal | None: ...

    @property
    def usd_per_1m_cached_input(self) -> Decimal | None: ...

    @property
    def usd_per_1m_image_output(self) -> Decimal | None: ...

    @property
    def usd_per_1m_text_output(self) -> Decimal | None: ...

    @property
    def ceiling_usd_per_image(self) -> Decimal | None: ...

    @property
    def effective_from(self) -> datetime | None: ...


TOKEN_RATES = ("usd_per_1m_text_input", "usd_per_1m_image_input", "usd_per_1m_cached_input",
               "usd_per_1m_image_output", "usd_per_1m_text_output")


def by_tokens(row: PriceRow) -> bool:
    return any(getattr(row, name) is not None for name in TOKEN_RATES)


def matches(pattern: str, model: str) -> bool:
    return pattern == model or ("*" in pattern and fnmatchcase(model, pattern))


Row = TypeVar("Row", bound=PriceRow)


def price_in_effect(rows: Sequence[Row], *, model: str, size: str | None, quality: str | None,
                    at: datetime) -> Row | None:
    """The row that prices this request: among those for the model (by name, or a ``*`` pattern) and this size and
    quality (empty matches any) in effect at ``at``, the most specific (the exact name, then the longest pattern,
    then size, then quality), and of those the latest to take effect; ``None`` when no row applies (it costs 0)."""
    best, best_key = None, None
    for row in rows:
        if not matches(row.model, model) or row.size not in ("", size) or row.quality not in ("", quality):
            continue
        if row.effective_from is not None and row.effective_from > at:
            continue
        key = (row.model == model, len(row.model), row.size != "", row.quality != "",
               row.effective_from or datetime.min.replace(tzinfo=at.tzinfo))
        if best_key is None or key > best_key:
            best, best_key = row, key
    return best


def _micros(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def output_tokens_ceiling(size: str | None, quality: str | None) -> int:
    """Image output tokens one image can take by OpenAI's table: the size's (scaled by area when not listed), at the
    quality asked (auto or none: high)."""
    tier = QUALITY_TIERS.get(quality or "", quality or "")
    tier = tier if tier in ("low", "medium", "high") else "high"
    if size in OUTPUT_TOKENS:
        return OUTPUT_TOKENS[size][tier]
    width, _, height = (size or "").partition("x")
    if not (width.isdecimal() and height.isdecimal()):
        return max(row[tier] for row in OUTPUT_TOKENS.values())
    return math.ceil(OUTPUT_TOKENS["1024x1024"][tier] * int(width) * int(height) / (1024 * 1024))


def _rate(row: PriceRow, name: str) -> Decimal:
    value = getattr(row, name)
    return value if value is not None else Decimal(0)


@dataclass(frozen=True)
class Ask:
    """What the hold is computed from: the request as the client sent it."""

    n: int
    size: str | None
    quality: str | None
    prompt_chars: int
    input_images: int
    calls: int  # provider calls the gateway will make for ``n``


def hold_micros(row: PriceRow | None, ask: Ask) -> int:
    """The most the request is expected to cost: per image, ``n`` images; by tokens, ``n`` images at the row's
    ceiling (else OpenAI's output table at the image output rate), plus each call's prompt and input images."""
    if row is None:
        return 0
    if not by_tokens(row):
        return _micros(row.usd_per_image * 1_000_000) * ask.n
    if row.ceiling_usd_per_image is not None:
        per_image = row.ceiling_usd_per_image * 1_000_000
    else:
        per_image = output_tokens_ceiling(ask.size, ask.quality) * _rate(row, "usd_per_1m_image_output")
    # A token is at least one character; the prompt's text is counted by characters, an upper bound.
    inputs = ((ask.prompt_chars + PROMPT_OVERHEAD_TOKENS) * _rate(row, "usd_per_1m_text_input")
              + ask.input_images * INPUT_IMAGE_TOKENS * _rate(row, "usd_per_1m_image_input"))
    return _micros(per_image * ask.n + inputs * ask.calls)


@dataclass(frozen=True)
class Tokens:
    """A provider's ``usage``, summed over the calls that delivered images."""

    text_input: int = 0
    image_input: int = 0
    cached_input: int = 0
    image_output: int = 0
    text_output: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.text_input, self.image_input, self.cached_input, self.image_output, self.text_output)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens_from_usage(usage: Any) -> Tokens | None:
    """OpenAI's image ``usage`` as token counts; ``None`` when the answer carries none. Input without details is
    text; output without ``output_tokens_details`` (the streamed ``completed`` event never has it) is image tokens.
    Cached tokens are part of the input counts and are taken out of the text tokens first, then the image tokens."""
    if not isinstance(usage, dict) or not any(k in usage for k in ("input_tokens", "output_tokens")):
        return None
    found = usage.get("input_tokens_details")
    details: dict[str, Any] = found if isinstance(found, dict) else {}
    total_in = _count(usage.get("input_tokens"))
    image_in = min(_count(details.get("image_tokens")), total_in)
    text_in = _count(details.get("text_tokens")) if "text_tokens" in details else total_in - image_in
    cached = min(_count(details.get("cached_tokens")), text_in + image_in)
    from_text = min(cached, text_in)
    out = _count(usage.get("output_tokens"))
    out_details = usage.get("output_tokens_details")
    if isinstance(out_details, dict) and ("image_tokens" in out_details or "text_tokens" in out_details):
        image_out, text_out = _count(out_details.get("image_tokens")), _count(out_details.get("text_tokens"))
    else:
        image_out, text_out = out, 0
    return Tokens(text_in - from_text, image_in - (cached - from_text), cached, image_out, text_out)


def token_micros(row: PriceRow, tokens: Tokens) -> int:
    rates = [_rate(row, name) for name in TOKEN_RATES]
    return _micros(sum((Decimal(count) * rate for count, rate in zip(tokens.as_tuple(), rates, strict=True)),
                       Decimal(0)))


@dataclass(frozen=True)
class Charge:
    micros: int
    by_tokens: bool


def charge_micros(row: PriceRow | None, *, images: int, tokens: Tokens | None, size: str | None = None,
                  quality: str | None = None) -> Charge:
    """What delivered images cost: by the provider's token usage where the row is priced by tokens and the answer
    reported usage; else per image (a token-priced row without a per-image figure then charges what it holds for an
    image's output: its ceiling, else OpenAI's table at the image output rate)."""
    if row is None or images <= 0:
        return Charge(0, False)
    if by_tokens(row) and tokens is not None:
        return Charge(token_micros(row, tokens), True)
    per_image = row.usd_per_image * 1_000_000
    if by_tokens(row) and not per_image:
        per_image = (row.ceiling_usd_per_image * 1_000_000 if row.ceiling_usd_per_image is not None
                     else output_tokens_ceiling(size, quality) * _rate(row, "usd_per_1m_image_output"))
    return Charge(_micros(per_image) * images, False)


def with_multiplier(micros: int, multiplier: Decimal) -> int:
    """A group's price multiplier applied to an amount (rounded up: a margin never loses a micro-dollar)."""
    return micros if multiplier == 1 else _micros(Decimal(micros) * multiplier)


def unit_prices(row: PriceRow | None) -> JSONDict:
    """The rates a row applied, as the usage row keeps them (so a later change of the row rewrites nothing)."""
    if row is None:
        return {}
    if not by_tokens(row):
        return {"usd_per_image": str(row.usd_per_image)}
    return {name: str(getattr(row, name)) for name in (*TOKEN_RATES, "ceiling_usd_per_image", "usd_per_image")
            if getattr(row, name) is not None}
