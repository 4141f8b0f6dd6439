"""The shared state in Redis (REDIS_URL): every change a Lua script (``lua/``) or a MULTI, and every change to a
version published on the versions channel in the same step, for every process's ``VersionListener``."""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings

from gateway.state.base import Admission, CircuitView, LeaseAsk, Window, new_version
from gateway.state.listener import VERSIONS_CHANNEL, VersionListener

CONFIG_VERSION, CIRCUITS_VERSION = "oo8:config-version", "oo8:circuits-version"
LUA = Path(__file__).with_name("lua")


@cache
def lua(name: str) -> str:
    """A script from ``lua/``; those that change a circuit start with the function that moves the circuits version."""
    body = (LUA / f"{name}.lua").read_text()
    if name in ("claim_probe", "circuit_failed", "circuit_ok"):
        body = (LUA / "move_circuits_version.lua").read_text() + body
    return body


class RedisState:
    def __init__(self, url: str) -> None:
        import redis

        # More requests run at once than a worker has connections, so a call waits for a free connection (up to
        # OPENOPEN8_REDIS_POOL_TIMEOUT) instead of failing with redis-py's "Too many connections".
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=settings.OPENOPEN8_REDIS_POOL_SIZE, timeout=settings.OPENOPEN8_REDIS_POOL_TIMEOUT,
            socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
        self.redis = redis.Redis(connection_pool=pool)
        self._admit = self.redis.register_script(lua("admit"))
        self._claim_probe = self.redis.register_script(lua("claim_probe"))
        self._circuit_failed = self.redis.register_script(lua("circuit_failed"))
        self._circuit_ok = self.redis.register_script(lua("circuit_ok"))
        self._start_circuits_version = self.redis.register_script(lua("start_circuits_version"))
        # Pub/sub channels are not kept apart by database number: the number goes in the name.
        self.channel = f"{VERSIONS_CHANNEL}:{pool.connection_kwargs.get('db', 0)}"
        self.url = url
        self._listener: VersionListener | None = None
        self._listener_lock = threading.Lock()

    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        now, holder = time.time(), uuid.uuid4().hex
        seconds = window.seconds if window else 60
        start = int(now // seconds) * seconds
        window_key, amount, limit = (f"oo8:{window.key}:{start}", window.amount, window.limit) if window else ("", 0, 0)
        lease_key, places, ttl = (f"oo8:lease:{lease.key}", lease.limit, lease.ttl) if lease else ("", 0, 0.0)
        refused = self._admit(keys=[window_key, lease_key],
                              args=[amount, limit, seconds * 2, now, places, now + ttl, holder, math.ceil(ttl) + 60])
        if refused == 1:
            return Admission("window", start + seconds - now)
        if refused == 2:
            return Admission("lease")
        return Admission(lease_id=holder if lease else None)

    def release(self, key: str, lease_id: str) -> None:
        self.redis.zrem(f"oo8:lease:{key}", lease_id)

    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        pipe = self.redis.pipeline(transaction=False)
        for channel_id in channel_ids:
            pipe.hgetall(f"oo8:circuit:{channel_id}")
        views = {}
        for channel_id, raw in zip(channel_ids, pipe.execute(), strict=True):
            if raw:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                views[channel_id] = CircuitView(int(fields.get("failures", 0)), int(fields.get("trips", 0)),
                                                float(fields["open_until"]) if "open_until" in fields else None)
        return views

    def _circuit_call(self, script: Any, channel_id: int, *args: Any) -> Any:
        """Run a script that changes a circuit: its keys and the version arguments every such script takes first."""
        return script(keys=[f"oo8:circuit:{channel_id}", CIRCUITS_VERSION],
                      args=[new_version(), self.channel, *args])

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        now = time.time()
        version = self._circuit_call(self._claim_probe, channel_id, now, now + ttl)
        if version:
            self._heard(circuits=int(version))
        return bool(version)

    def circuit_failed(self, channel_id: int) -> CircuitView:
        failures, trips, open_until, version = self._circuit_call(
            self._circuit_failed, channel_id, settings.OPENOPEN8_BREAKER_THRESHOLD, time.time(),
            settings.OPENOPEN8_BREAKER_COOLDOWN, settings.OPENOPEN8_BREAKER_MAX_COOLDOWN)
        self._heard(circuits=int(version))
        return CircuitView(int(failures), int(trips), float(open_until) if open_until else None)

    def circuit_ok(self, channel_id: int) -> None:
        self._heard(circuits=int(self._circuit_call(self._circuit_ok, channel_id)))

    def versions(self) -> tuple[int, int]:
        """From this process's listener while it is listening (no round trip), else read from Redis."""
        listener = self._listener
        known = listener.known() if listener is not None and listener.pid == os.getpid() else None
        return known if known is not None else self.read_versions()

    def read_versions(self) -> tuple[int, int]:
        config, circuits = self.redis.mget([CONFIG_VERSION, CIRCUITS_VERSION])
        if circuits is None:  # a new or emptied Redis: start counting where no process can have seen it before
            circuits = self._start_circuits_version(keys=[CIRCUITS_VERSION], args=[new_version(), self.channel])
        return int(config or 0), int(circuits)

    def bump_config_version(self) -> None:
        version = new_version()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(CONFIG_VERSION, version)
        pipe.publish(self.channel, f"config {version}")
        pipe.execute()
        self._heard(config=version)

    def listen(self) -> None:
        """Start this process's listener, once per process (a fork starts its own)."""
        with self._listener_lock:
            if self._listener is None or self._listener.pid != os.getpid():
                self._listener = VersionListener(self.url, self.channel, read=self.read_versions)
                self._listener.start()

    def listening(self) -> bool:
        """True while this process's listener holds both versions and has heard from Redis lately."""
        return self._listener is not None and self._listener.known() is not None

    def health(self) -> dict[str, str]:
        try:
            self.redis.ping()
        except Exception as e:  # any client error means not ready
            return {"redis": f"error: {type(e).__name__}"}
        return {"redis": "ok"}

    def _heard(self, **versions: int) -> None:
        # What this process changed it knows at once, before its own message comes back.
        if self._listener is not None:
            self._listener.heard(**versions)
