"""What every worker and every node shares, as three protocols: limits (fixed-window counters and in-flight leases),
circuit breakers, and the configuration and circuits versions. Each backend (``database.py``, ``redis.py``)
implements all three, every operation one atomic step, so concurrent requests cannot overrun a limit or trip a
breaker twice."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from django.conf import settings


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


@contextmanager
def admitted(state: Limits, *, window: Window | None, lease: LeaseAsk | None) -> Iterator[Admission]:
    """``state.admit(window=, lease=)`` for the block, the lease (if one was taken) given back when it ends."""
    admission = state.admit(window=window, lease=lease)
    try:
        yield admission
    finally:
        if lease is not None and admission.lease_id is not None:
            state.release(lease.key, admission.lease_id)


def cooldown(trips: int) -> float:
    """Seconds a circuit stays open after its ``trips``-th consecutive trip: doubling, capped."""
    doubled = settings.OPENOPEN8_BREAKER_COOLDOWN * 2 ** max(trips - 1, 0)
    return float(min(doubled, settings.OPENOPEN8_BREAKER_MAX_COOLDOWN))


def new_version() -> int:
    """A fresh version: random rather than counted, so a version rolled back with its database (or a restored
    backup, or an emptied Redis) is never mistaken for a later one."""
    return random.randrange(1, 2**31 - 1)
