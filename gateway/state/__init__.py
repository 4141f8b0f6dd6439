"""The process's shared-state backend: Redis when REDIS_URL is set, else the database (``base.py`` has the
protocols)."""

from __future__ import annotations

from functools import cache

from django.conf import settings

from gateway.state.base import (
    Admission,
    CircuitView,
    LeaseAsk,
    SharedState,
    Window,
    admitted,
    lease_renewal_start,
    lease_ttl,
)

__all__ = ["Admission", "CircuitView", "LeaseAsk", "SharedState", "Window", "admitted", "lease_renewal_start",
           "lease_ttl", "shared_state"]


@cache
def _state_for(redis_url: str) -> SharedState:
    if redis_url:
        from gateway.state.redis import RedisState

        return RedisState(redis_url)
    from gateway.state.database import DatabaseState

    return DatabaseState()


def shared_state() -> SharedState:
    """The backend for the current REDIS_URL, one per process."""
    return _state_for(settings.REDIS_URL)
