"""Per-process caches of what operators configure (tokens, channels, prices), so a request needs no query to find
them. Any change an operator makes moves a configuration version that every process and node shares (Redis or the
database). A request takes one ``ConfigSnapshot`` (authentication does, with one read of the versions) and passes it
down: everything it reads comes from the cache generation of that version. The channels' circuits are kept until the
circuits version moves; with Redis both versions come from the process's subscription (gateway/state/listener.py),
without a round trip.

Writes that bypass model signals (``QuerySet.update`` on these models) must call ``config_changed()``.
"""

from __future__ import annotations

import threading
from typing import Any

from django.db import connection, transaction
from django.db.models import Q

from channels.models import Channel
from gateway.models import ApiToken, Price
from gateway.pricing import matches
from gateway.state import CircuitView, shared_state

MAX_TOKEN_ENTRIES = 10_000


class _Generation:
    """What was read under one configuration version."""

    def __init__(self, version: int | None) -> None:
        self.version = version
        self.tokens: dict[str, list[ApiToken]] = {}
        self.channels: list[Channel] | None = None
        self.prices: dict[str, list[Price]] = {}


_lock = threading.Lock()
_generation = _Generation(None)
# channel id -> (the circuits version it was read under, its circuit; None when closed with no faults)
_circuits: dict[int, tuple[int, CircuitView | None]] = {}


class ConfigSnapshot:
    """The configuration as one request sees it: one version throughout, read at most once per process and
    version."""

    def __init__(self, generation: _Generation, circuits_version: int) -> None:
        self._generation, self.circuits_version = generation, circuits_version

    def tokens_with_prefix(self, prefix: str) -> list[ApiToken]:
        tokens = self._generation.tokens
        found = tokens.get(prefix)
        if found is None:
            found = list(ApiToken.objects.filter(key_prefix=prefix).select_related("group"))
            if len(tokens) >= MAX_TOKEN_ENTRIES:  # unknown keys must not grow the cache without bound
                tokens.clear()
            tokens[prefix] = found
        return found

    def enabled_channels(self) -> list[Channel]:
        if self._generation.channels is None:
            self._generation.channels = list(Channel.objects.filter(enabled=True))
        return self._generation.channels

    def prices_for(self, model: str) -> list[Price]:
        """The price rows that may apply to ``model``: its own, and every pattern (``pricing.price_in_effect``
        picks)."""
        prices = self._generation.prices.get(model)
        if prices is None:
            rows = Price.objects.filter(Q(model=model) | Q(model__contains="*"))
            prices = self._generation.prices[model] = [row for row in rows if matches(row.model, model)]
        return prices

    def circuits_for(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        """The channels' circuits as ``Circuits.circuits`` gives them: those read since the circuits version last
        moved come from the cache, the rest are read in one round trip."""
        version = self.circuits_version
        stale = [pk for pk in channel_ids if _circuits.get(pk, (None, None))[0] != version]
        if stale:
            read = shared_state().circuits(stale)
            _circuits.update((pk, (version, read.get(pk))) for pk in stale)
        return {pk: view for pk in channel_ids if (view := _circuits[pk][1]) is not None}


def config_snapshot() -> ConfigSnapshot:
    """The configuration for one request: the process's cache, emptied first if the shared version moved. One read
    of the versions at most."""
    global _generation
    version, circuits_version = shared_state().versions()
    generation = _generation
    if version != generation.version:
        with _lock:
            if version != _generation.version:
                _generation = _Generation(version)
            generation = _generation
    return ConfigSnapshot(generation, circuits_version)


def cache_reset() -> None:
    """Forget everything cached in this process (tests: ids repeat once a test's rows are rolled back)."""
    global _generation
    with _lock:
        _generation = _Generation(None)
        _circuits.clear()


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
