"""OpenAI's published token rates for the GPT image models, USD per 1M tokens: text input, cached input (text),
image input, image output. Sources: openai.com/api/pricing as quoted on the models' pages (gpt-image-1, -1-mini and
-1.5 from 2025-12; gpt-image-2 from its 2026-04-21 snapshot); chatgpt-image-latest is an alias of gpt-image-1.5.
Holds use OpenAI's output-token table (gateway/pricing.py) at the image output rate. gpt-image-2.5-* and -2.6-*
have no published rates here: an operator sets them (a pattern row such as gpt-image-2.6* covers a family)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import migrations

TOKEN_PRICES = [
    # model, text input, cached input, image input, image output
    ("gpt-image-1", "5.00", "1.25", "10.00", "40.00"),
    ("gpt-image-1-mini", "2.00", "0.20", "2.50", "8.00"),
    ("gpt-image-1.5", "5.00", "1.25", "8.00", "32.00"),
    ("chatgpt-image-latest", "5.00", "1.25", "8.00", "32.00"),
    ("gpt-image-2", "5.00", "1.25", "8.00", "30.00"),
]


def add_prices(apps: Any, schema_editor: Any) -> None:
    Price = apps.get_model("gateway", "Price")
    for model, text, cached, image, output in TOKEN_PRICES:
        if not Price.objects.filter(model=model).exists():  # an operator's own price for it stays
            Price.objects.create(model=model, usd_per_1m_text_input=Decimal(text),
                                 usd_per_1m_cached_input=Decimal(cached), usd_per_1m_image_input=Decimal(image),
                                 usd_per_1m_image_output=Decimal(output))


class Migration(migrations.Migration):
    dependencies = [("gateway", "0007_budgets_groups_token_prices")]
    operations = [migrations.RunPython(add_prices, migrations.RunPython.noop)]
