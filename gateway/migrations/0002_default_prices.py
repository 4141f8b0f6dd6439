"""OpenAI's published DALL·E list prices, per image. Other models cost 0 until an operator sets a price."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import migrations

DEFAULT_PRICES = [
    ("dall-e-2", "256x256", "", "0.016"),
    ("dall-e-2", "512x512", "", "0.018"),
    ("dall-e-2", "1024x1024", "", "0.020"),
    ("dall-e-3", "1024x1024", "standard", "0.040"),
    ("dall-e-3", "1792x1024", "standard", "0.080"),
    ("dall-e-3", "1024x1792", "standard", "0.080"),
    ("dall-e-3", "1024x1024", "hd", "0.080"),
    ("dall-e-3", "1792x1024", "hd", "0.120"),
    ("dall-e-3", "1024x1792", "hd", "0.120"),
]


def add_prices(apps: Any, schema_editor: Any) -> None:
    Price = apps.get_model("gateway", "Price")
    for model, size, quality, usd in DEFAULT_PRICES:
        Price.objects.get_or_create(model=model, size=size, quality=quality,
                                    defaults={"usd_per_image": Decimal(usd)})


class Migration(migrations.Migration):
    dependencies = [("gateway", "0001_initial")]
    operations = [migrations.RunPython(add_prices, migrations.RunPython.noop)]
