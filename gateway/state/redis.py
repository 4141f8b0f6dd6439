"""The shared state in Redis (REDIS_URL): every change a Lua script (``lua/``) or a MULTI, and every change to a
version published on the versions channel in the same step, for every process's ``VersionListener``.

Redis speeds the gateway up; it is not needed to serve. While it does not answer (``_Outage``: one try a second, the
rest go straight to the fallback), the configuration is read from the database at most every
``OUTAGE_REFRESH_S``, circuits keep the state last read and count nothing, and only requests under a limit are
refused (503 with Retry-After: a limit that cannot be counted is not exceeded silently). One log line an outage."""

from __future__ import annotations

import logging
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
from openopen8.core.errors import ServiceUnavailable

log = logging.getLogger(__name__)

CONFIG_VERSION, CIRCUITS_VERSION = "oo8:config-version", "oo8:circuits-version"
LUA = Path(__file__).with_name("lua")
# While Redis is away: one request a second tries it, and the configuration is read again this often (seconds).
PROBE_EVERY_S, OUTAGE_REFRESH_S = 1.0, 5.0
LIMITS_RETRY_AFTER_S = 5


class _Outage:
    """Whether this process finds Redis answering; while it does not, one caller a second may try it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down_since: float | None = None
        self.next_try = 0.0
        self.trying = False

    def may_try(self) -> bool:
        if self.down_since is None:
            return True
        with self.lock:
            if self.trying or time.monotonic() < self.next_try:
                return False
            self.trying = True
            return True

    def failed(self, error: BaseException) -> None:
        with self.lock:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.error("Redis does not answer (%s: %s); serving from the database, and refusing requests under "
                          "a limit with 503, until it is back", type(error).__name__, str(error)[:200])
            self.next_try, self.trying = time.monotonic() + PROBE_EVERY_S, False

    def answered(self) -> bool:
        """Note that Redis answered; ``True`` when that ends an outage."""
        if self.down_since is None:
            return False
        with self.lock:
            if self.down_since is None:
                return False
            log.warning("Redis answers again after %.1f s", time.monotonic() - self.down_since)
            self.down_since, self.trying = None, False
            return True


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


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
        self._outage = _Outage()
        self._errors = _redis_errors()
        self._circuits_read: dict[int, CircuitView | None] = {}  # the circuits last read, for an outage
        # Readiness asks with its own short timeouts, so that it answers within about a second.
        self._health = redis.Redis.from_url(url, socket_timeout=0.8, socket_connect_timeout=0.8)

    def _guarded(self, call: Any, fallback: Any) -> Any:
        """``call()``, or ``fallback()`` while Redis does not answer."""
        if not self._outage.may_try():
            return fallback()
        try:
            result = call()
        except self._errors as error:
            self._outage.failed(error)
            return fallback()
        if self._outage.answered():
            # Changes made during the outage were announced to nobody: every process reads its configuration again.
            self._guarded(self._bump_config_version, lambda: None)
        return result

    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        return self._guarded(lambda: self._admit_now(window, lease), _limits_unavailable)  # type: ignore[no-any-return]

    def _admit_now(self, window: Window | None, lease: LeaseAsk | None) -> Admission:
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
        # Not given back while Redis is away: the place lapses at its expiry.
        self._guarded(lambda: self.redis.zrem(f"oo8:lease:{key}", lease_id), lambda: None)

    def renew(self, leases: list[tuple[str, str]], ttl: float) -> None:
        expires = time.time() + ttl
        pipe = self.redis.pipeline(transaction=False)
        for key, lease_id in leases:
            pipe.zadd(f"oo8:lease:{key}", {lease_id: expires}, xx=True)  # a place already given back stays gone
            pipe.expire(f"oo8:lease:{key}", math.ceil(ttl) + 60)
        pipe.execute()

    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        def last_read() -> dict[int, CircuitView]:
            return {pk: view for pk in channel_ids if (view := self._circuits_read.get(pk)) is not None}

        views: dict[int, CircuitView] = self._guarded(lambda: self._read_circuits(channel_ids), last_read)
        return views

    def _read_circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        pipe = self.redis.pipeline(transaction=False)
        for channel_id in channel_ids:
            pipe.hgetall(f"oo8:circuit:{channel_id}")
        views = {}
        for channel_id, raw in zip(channel_ids, pipe.execute(), strict=True):
            if raw:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                views[channel_id] = CircuitView(int(fields.get("failures", 0)), int(fields.get("trips", 0)),
                                                float(fields["open_until"]) if "open_until" in fields else None)
        self._circuits_read.update((pk, views.get(pk)) for pk in channel_ids)
        return views

    def _circuit_call(self, script: Any, channel_id: int, *args: Any) -> Any:
        """Run a script that changes a circuit: its keys and the version arguments every such script takes first."""
        return script(keys=[f"oo8:circuit:{channel_id}", CIRCUITS_VERSION],
                      args=[new_version(), self.channel, *args])

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        def claim() -> bool:
            now = time.time()
            version = self._circuit_call(self._claim_probe, channel_id, now, now + ttl)
            if version:
                self._heard(circuits=int(version))
            return bool(version)

        return bool(self._guarded(claim, lambda: True))  # no one to agree with: this request probes

    def circuit_failed(self, channel_id: int) -> CircuitView:
        def failed() -> CircuitView:
            failures, trips, open_until, version = self._circuit_call(
                self._circuit_failed, channel_id, settings.OPENOPEN8_BREAKER_THRESHOLD, time.time(),
                settings.OPENOPEN8_BREAKER_COOLDOWN, settings.OPENOPEN8_BREAKER_MAX_COOLDOWN)
            self._heard(circuits=int(version))
            return CircuitView(int(failures), int(trips), float(open_until) if open_until else None)

        view: CircuitView = self._guarded(failed, CircuitView)
        return view

    def circuit_ok(self, channel_id: int) -> None:
        self._guarded(lambda: self._heard(circuits=int(self._circuit_call(self._circuit_ok, channel_id))),
                      lambda: None)

    def versions(self) -> tuple[int, int]:
        """From this process's listener while it is listening (no round trip), else read from Redis; while Redis
        is away, versions of the outage's own that move every OUTAGE_REFRESH_S (negative, where Redis's are not)."""
        listener = self._listener
        known = listener.known() if listener is not None and listener.pid == os.getpid() else None
        if known is not None:
            return known
        versions: tuple[int, int] = self._guarded(self.read_versions, _outage_versions)
        return versions

    def read_versions(self) -> tuple[int, int]:
        config, circuits = self.redis.mget([CONFIG_VERSION, CIRCUITS_VERSION])
        if circuits is None:  # a new or emptied Redis: start counting where no process can have seen it before
            circuits = self._start_circuits_version(keys=[CIRCUITS_VERSION], args=[new_version(), self.channel])
        return int(config or 0), int(circuits)

    def bump_config_version(self) -> None:
        # Lost while Redis is away; every process reads its configuration again when it is back.
        self._guarded(self._bump_config_version, lambda: None)

    def _bump_config_version(self) -> None:
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
            self._health.ping()
        except Exception as e:  # any client error means not ready
            return {"redis": f"error: {type(e).__name__}"}
        return {"redis": "ok"}

    def _heard(self, **versions: int) -> None:
        # What this process changed it knows at once, before its own message comes back.
        if self._listener is not None:
            self._listener.heard(**versions)


def _limits_unavailable() -> Admission:
    raise ServiceUnavailable("The gateway cannot count this request against its limits right now; try again "
                             "shortly.", code="limits_unavailable", retry_after=LIMITS_RETRY_AFTER_S)


def _outage_versions() -> tuple[int, int]:
    step = -1 - int(time.monotonic() // OUTAGE_REFRESH_S)
    return step, step
