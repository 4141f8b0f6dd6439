"""Per-process caches of what operators configure (tokens, channels, prices), so a request needs no query to find
them. Any change an operator makes moves a configuration version that every process and node shares (Redis or the
database); each request checks that number and drops its process's caches when it moved. With Redis it also checks
the circuits version, and the channels' circuits are kept until that moves; both come from the process's
subscription to their changes (gateway/shared.py, VersionListener), without a round trip.

Writes that bypass model signals (``QuerySet.update`` on these models) must call ``config_changed()``.
"""

from __future__ import annotations

import threading
from typing import Any

from django.db import connection, transaction
from django.db.models.signals import post_delete, post_save

from channels.models import Channel
from gateway.models import ApiToken, Price
from gateway.shared import CircuitView, shared_state

MAX_TOKEN_ENTRIES = 10_000


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version: int | None = None
        self.tokens: dict[str, list[ApiToken]] = {}
        self.channels: list[Channel] | None = None
        self.prices: dict[str, list[Price]] = {}
        self.circuits_version: int | None = None
        # channel id -> (the circuits version it was read under, its circuit; None when closed with no faults)
        self.circuits: dict[int, tuple[int, CircuitView | None]] = {}


_cache = _Cache()


def fresh() -> _Cache:
    """The process's cache, emptied first if the shared configuration version moved. One round trip."""
    version, _cache.circuits_version = shared_state().versions()
    if version != _cache.version:
        with _cache.lock:
            _cache.version, _cache.tokens, _cache.channels, _cache.prices = version, {}, None, {}
    return _cache


def tokens_with_prefix(prefix: str) -> list[ApiToken]:
    cache = fresh()
    found = cache.tokens.get(prefix)
    if found is None:
        found = list(ApiToken.objects.filter(key_prefix=prefix))
        if len(cache.tokens) >= MAX_TOKEN_ENTRIES:  # unknown keys must not grow the cache without bound
            cache.tokens.clear()
        cache.tokens[prefix] = found
    return found


def enabled_channels() -> list[Channel]:
    """Enabled channels; read from the cache that ``tokens_with_prefix`` already freshened for this request."""
    if _cache.channels is None:
        _cache.channels = list(Channel.objects.filter(enabled=True))
    return _cache.channels


def prices_for(model: str) -> list[Price]:
    prices = _cache.prices.get(model)
    if prices is None:
        prices = _cache.prices[model] = list(Price.objects.filter(model=model))
    return prices


def circuits_for(channel_ids: list[int]) -> dict[int, CircuitView]:
    """The channels' circuits as ``SharedState.circuits`` gives them. Those read since the circuits version last
    moved (read by ``fresh()`` for this request) come from the cache; the rest are read in one round trip."""
    version, cached = _cache.circuits_version, _cache.circuits
    if version is None:
        return shared_state().circuits(channel_ids)
    stale = [pk for pk in channel_ids if cached.get(pk, (None, None))[0] != version]
    if stale:
        read = shared_state().circuits(stale)
        cached.update((pk, (version, read.get(pk))) for pk in stale)
    return {pk: view for pk in channel_ids if (view := cached[pk][1]) is not None}


def config_changed(*args: Any, **kwargs: Any) -> None:
    """Tell every process that tokens, channels or prices changed: now, and again once the change is committed.

    Said only now, a process could read the row between this and the commit (the admin saves inside a transaction),
    and keep the old row in its cache under the new version until the next change: a disabled key would go on
    working. The second announcement, after the commit, drops that copy. (Said only after the commit, this
    transaction's own reads would miss the change.)"""
    state = shared_state()
    state.bump_config_version()
    if connection.in_atomic_block:
        transaction.on_commit(state.bump_config_version)


for model in (ApiToken, Channel, Price):
    post_save.connect(config_changed, sender=model, dispatch_uid=f"config-changed-save-{model.__name__}")
    post_delete.connect(config_changed, sender=model, dispatch_uid=f"config-changed-delete-{model.__name__}")
