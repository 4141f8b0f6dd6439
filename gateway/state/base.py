"""What every worker and every node shares, as three protocols: limits (fixed-window counters and in-flight leases),
circuit breakers, and the configuration and circuits versions. Each backend (``database.py``, ``redis.py``)
implements all three, every operation one atomic step, so concurrent requests cannot overrun a limit or trip a
breaker twice."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from django.conf import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CircuitView:
    failures: int = 0
    trips: int = 0
    open_until: float | None = None

    def state(self, now: float) -> str:
        """``closed``, ``open`` (skipped until ``open_until``), or ``half_open`` (one probe may go)."""
        if self.open_until is None:
            return "closed"
        return "open" if self.open_until > now else "half_open"


class Window(NamedTuple):
    """Count ``amount`` in the current fixed window of ``seconds`` if the total stays within ``limit``."""

    key: str
    amount: int
    limit: int
    seconds: int = 60


class LeaseAsk(NamedTuple):
    """Take one of ``limit`` places under ``key``; a place lapses after ``ttl`` seconds if never given back."""

    key: str
    limit: int
    ttl: float


@dataclass(frozen=True)
class Admission:
    """What ``Limits.admit`` decided: ``refused`` is None (admitted, holding ``lease_id`` if a lease was asked for),
    ``"window"`` (the window is full for ``wait`` more seconds) or ``"lease"`` (every place is taken)."""

    refused: str | None = None
    wait: float = 0.0
    lease_id: str | None = None


class Limits(Protocol):
    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        """Count in the window and take a lease, both or neither, in one step: a request refused by one limit uses up
        nothing of the other."""

    def release(self, key: str, lease_id: str) -> None:
        """Give back a place ``admit`` took."""

    def renew(self, leases: list[tuple[str, str]], ttl: float) -> None:
        """Move the expiry of these places (key, lease id) to ``ttl`` seconds from now."""


class Circuits(Protocol):
    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        """The circuits of these channels that are not closed-and-clean."""

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        """For a half-open circuit: True for the one request that may probe the channel now."""

    def circuit_failed(self, channel_id: int) -> CircuitView:
        """Count a channel fault; open the circuit at the threshold, or again (longer) when a probe failed."""

    def circuit_ok(self, channel_id: int) -> None:
        """The channel worked: close its circuit."""


class Versions(Protocol):
    def versions(self) -> tuple[int, int]:
        """A number that moves whenever an operator changes tokens, channels or prices, and one that moves whenever a
        circuit's record changes. At most one round trip; every request asks."""

    def bump_config_version(self) -> None:
        """Tell every process and node that the configuration changed."""

    def listen(self) -> None:
        """Start keeping the versions current in this process without a round trip, where the backend can."""

    def health(self) -> dict[str, str]:
        """What readiness reports of this backend beyond the database: name -> ``ok`` or the error."""


class SharedState(Limits, Circuits, Versions, Protocol):
    """The three together, as one backend provides them."""


class _Renewal:
    """The leases this process holds, renewed every third of their time to live by one thread (a greenlet under
    gevent): a request holds its place as long as it runs, and a dead worker's places lapse within the time to
    live."""

    def __init__(self, ttl: float) -> None:
        self.pid, self.ttl = os.getpid(), ttl
        self.held: dict[str, tuple[Limits, str]] = {}  # lease id -> its backend and key
        threading.Thread(target=self._run, name="openopen8-leases", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.ttl / 3)
            by_state: dict[int, tuple[Limits, list[tuple[str, str]]]] = {}
            for lease_id, (state, key) in list(self.held.items()):
                by_state.setdefault(id(state), (state, []))[1].append((key, lease_id))
            for state, leases in by_state.values():
                try:
                    state.renew(leases, self.ttl)
                except Exception as error:  # the store is away: the places lapse unless it comes back in time
                    log.warning("could not renew %d lease(s): %s", len(leases), type(error).__name__)


_renewal: _Renewal | None = None


def lease_renewal_start() -> None:
    """Renew this process's leases from now on (gunicorn workers), so they can live a short time."""
    global _renewal
    if _renewal is None or _renewal.pid != os.getpid():
        _renewal = _Renewal(settings.OPENOPEN8_LEASE_TTL)


def lease_ttl() -> float:
    """How long a place lives unrenewed: short where this process renews its leases, else past the longest request
    (a process without the renewal thread, as the test suite's client)."""
    renewal = _renewal
    if renewal is not None and renewal.pid == os.getpid():
        return renewal.ttl
    return float(settings.OPENOPEN8_REQUEST_DEADLINE + 60)


@contextmanager
def admitted(state: Limits, *, window: Window | None, lease: LeaseAsk | None) -> Iterator[Admission]:
    """``state.admit(window=, lease=)`` for the block, the lease (if one was taken) renewed while it runs and given
    back when it ends."""
    admission = state.admit(window=window, lease=lease)
    renewal = _renewal if _renewal is not None and _renewal.pid == os.getpid() else None
    if renewal is not None and lease is not None and admission.lease_id is not None:
        renewal.held[admission.lease_id] = (state, lease.key)
    try:
        yield admission
    finally:
        if lease is not None and admission.lease_id is not None:
            if renewal is not None:
                renewal.held.pop(admission.lease_id, None)
            state.release(lease.key, admission.lease_id)


def cooldown(trips: int) -> float:
    """Seconds a circuit stays open after its ``trips``-th consecutive trip: doubling, capped."""
    doubled = settings.OPENOPEN8_BREAKER_COOLDOWN * 2 ** max(trips - 1, 0)
    return float(min(doubled, settings.OPENOPEN8_BREAKER_MAX_COOLDOWN))


def new_version() -> int:
    """A fresh version: random rather than counted, so a version rolled back with its database (or a restored
    backup, or an emptied Redis) is never mistaken for a later one."""
    return random.randrange(1, 2**31 - 1)
