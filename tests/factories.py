"""Named helpers that build test data with keyword defaults."""

from __future__ import annotations

import base64
import io
import os
from datetime import datetime
from decimal import Decimal
from importlib import import_module
from typing import Any

from PIL import Image

from channels.models import Channel
from gateway.models import EPOCH, ApiToken, Price, UsageLog, to_micros
from gateway.services import token_create


def make_token(*, name: str = "alice", budget: str | None = None, allowed_models: str = "",
               **fields: Any) -> tuple[ApiToken, str]:
    """A saved token and its plaintext key."""
    token, key = token_create(name=name, budget_micros=None if budget is None else to_micros(Decimal(budget)),
                              allowed_models=allowed_models)
    if fields:
        for attr, value in fields.items():
            setattr(token, attr, value)
        token.save()
    return token, key


def make_channel(*, base_url: str = "", kind: str = "openai", models: str = "dall-e-2,dall-e-3",
                 api_key: str = "sk-provider-key-0001", **fields: Any) -> Channel:
    fields.setdefault("name", f"{kind} channel")
    return Channel.objects.create(kind=kind, base_url=base_url, served_models=models, api_key=api_key, **fields)


def make_price(*, model: str, usd: str, size: str = "", quality: str = "") -> Price:
    price, _ = Price.objects.update_or_create(model=model, size=size, quality=quality,
                                              defaults={"usd_per_image": Decimal(usd)})
    return price


def restore_default_prices() -> None:
    """The prices the migrations install; transactional test cases empty every table after each test."""
    for model, size, quality, usd in import_module("gateway.migrations.0002_default_prices").DEFAULT_PRICES:
        make_price(model=model, size=size, quality=quality, usd=usd)
    for model, text, cached, image, output in import_module(
            "gateway.migrations.0008_gpt_image_token_prices").TOKEN_PRICES:
        make_token_price(model=model, text_input=text, cached_input=cached, image_input=image, image_output=output)


def make_token_price(*, model: str, text_input: str = "0", image_input: str = "0", cached_input: str | None = None,
                     image_output: str = "0", text_output: str | None = None, ceiling: str | None = None,
                     size: str = "", quality: str = "", effective_from: datetime | None = None) -> Price:
    """A price by tokens: USD per 1M tokens of each kind."""
    rates = {"usd_per_1m_text_input": Decimal(text_input), "usd_per_1m_image_input": Decimal(image_input),
             "usd_per_1m_cached_input": None if cached_input is None else Decimal(cached_input),
             "usd_per_1m_image_output": Decimal(image_output),
             "usd_per_1m_text_output": None if text_output is None else Decimal(text_output),
             "ceiling_usd_per_image": None if ceiling is None else Decimal(ceiling), "usd_per_image": Decimal(0)}
    price, _ = Price.objects.update_or_create(model=model, size=size, quality=quality,
                                              effective_from=effective_from or EPOCH, defaults=rates)
    return price


def make_usage_log(**fields: Any) -> UsageLog:
    fields.setdefault("request_id", f"req_test_{UsageLog.objects.count()}")
    fields.setdefault("endpoint", "generations")
    return UsageLog.objects.create(**fields)


def png_bytes(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def png_b64(width: int = 8, height: int = 8) -> str:
    return base64.b64encode(png_bytes(width, height)).decode()


def openai_images(count: int = 1, *, style: str = "b64_json", url_base: str = "", **extra: Any) -> dict[str, Any]:
    """An OpenAI-style provider answer with ``count`` small PNGs, as base64 or as URLs under ``url_base``."""
    data = [{"b64_json": png_b64()} if style == "b64_json" else {"url": f"{url_base}/img/{i}.png"}
            for i in range(count)]
    return {"created": 1700000000, "data": data, **extra}


def image_bytes(width: int = 8, height: int = 8, *, fmt: str = "PNG", mode: str = "RGB",
                color: Any = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, fmt)
    return out.getvalue()


def mask_png(width: int, height: int, *, hole: tuple[int, int, int, int]) -> bytes:
    """An OpenAI mask: opaque everywhere but a fully transparent rectangle (left, top, right, bottom) to repaint."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


def noise_png(side: int) -> bytes:
    """A square PNG that does not compress: about 3 bytes per pixel."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG", compress_level=0)
    return out.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A tiny file that decodes to ``side``² pixels."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, "PNG")
    return out.getvalue()
