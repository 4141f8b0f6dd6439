"""Reads: which channels serve a model, and which price row applies."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import Sum

from channels.adapters import ChannelTarget
from gateway.cache import ConfigSnapshot
from gateway.models import Price, UsageLog
from gateway.pricing import price_in_effect

log = logging.getLogger(__name__)


def channel_targets_for(config: ConfigSnapshot, *, model: str) -> list[ChannelTarget]:
    """Enabled channels that serve ``model`` (by name, wildcard or mapping), as adapter targets. Cached."""
    targets = []
    for channel in config.enabled_channels():
        if not channel.serves(model):
            continue
        try:
            target = channel.to_target()
        except (ValueError, KeyError) as e:
            log.warning("channel %s skipped: its config no longer parses: %s", channel.pk, e)
            continue
        if target is not None:
            targets.append(target)
    return targets


def served_model_names(config: ConfigSnapshot) -> set[str]:
    """Every model name an enabled channel lists or maps. Cached."""
    names: set[str] = set()
    for channel in config.enabled_channels():
        names.update(channel.model_names(), channel.model_map)
    return names


def price_for(config: ConfigSnapshot, *, model: str, size: str | None, quality: str | None,
              at: datetime) -> Price | None:
    """The price row in effect at ``at`` for this model, size and quality (``pricing.price_in_effect``). Cached."""
    return price_in_effect(config.prices_for(model), model=model, size=size, quality=quality, at=at)


def ledger_micros(token_id: int) -> int:
    """What a token spent, summed from its usage rows."""
    total = UsageLog.objects.filter(token_id=token_id).aggregate(total=Sum("cost_micros"))["total"]
    return int(total or 0)
