"""State that every worker and every node shares: fixed-window counters, in-flight leases and circuit breakers.

Kept in Redis when REDIS_URL is set, otherwise in the database; never in one process's memory. Every operation is a
single atomic step (a Lua script, or one transaction), so concurrent requests cannot overrun a limit or trip a
breaker twice.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q

from channels.models import Circuit
from gateway.models import Counter, Lease

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


@dataclass(frozen=True)
class Admission:
    """What ``SharedState.admit`` decided: ``refused`` is None (admitted, holding ``lease_id`` if a lease was asked
    for), ``"window"`` (the window is full for ``wait`` more seconds) or ``"lease"`` (every place is taken)."""

    refused: str | None = None
    wait: float = 0.0
    lease_id: str | None = None


# A window to count in (key, amount, limit) and a lease to take (key, limit, ttl), for SharedState.admit.
Window = tuple[str, int, int]
LeaseAsk = tuple[str, int, float]


@contextmanager
def admitted(state: SharedState, *, window: Window | None, lease: LeaseAsk | None) -> Iterator[Admission]:
    """``state.admit(window=, lease=)`` for the block, the lease (if one was taken) given back when it ends."""
    admission = state.admit(window=window, lease=lease)
    try:
        yield admission
    finally:
        if lease is not None and admission.lease_id is not None:
            state.release(lease[0], admission.lease_id)


def cooldown(trips: int) -> float:
    """Seconds a circuit stays open after its ``trips``-th consecutive trip: doubling, capped."""
    doubled = settings.OPENOPEN8_BREAKER_COOLDOWN * 2 ** max(trips - 1, 0)
    return float(min(doubled, settings.OPENOPEN8_BREAKER_MAX_COOLDOWN))


def new_version() -> int:
    """A fresh configuration version: random rather than counted, so a version rolled back with its database (or a
    restored backup) is never mistaken for a later one."""
    return random.randrange(1, 2**31 - 1)


class SharedState(Protocol):
    def window_add(self, key: str, amount: int, *, limit: int, window: int = 60) -> float | None:
        """Count ``amount`` in the current window if the total stays within ``limit``; return ``None`` when counted,
        else the seconds until the window resets."""

    def lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        """Take one of ``limit`` places; return its id, or ``None`` when all are taken. It lapses after ``ttl``."""

    def release(self, key: str, lease_id: str) -> None: ...

    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        """Count in the window (per minute) and take a lease, both or neither, in one step: a request refused by
        one limit uses up nothing of the other."""

    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]: ...

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        """For a half-open circuit: True for the one request that may probe the channel now."""

    def circuit_failed(self, channel_id: int) -> CircuitView:
        """Count a channel fault; open the circuit at the threshold, or again (longer) when a probe failed."""

    def circuit_ok(self, channel_id: int) -> None: ...

    def versions(self) -> tuple[int, int | None]:
        """In one round trip at most: a number that moves whenever an operator changes tokens, channels or prices,
        and one that moves whenever a circuit's record changes (``None``: this backend does not keep one, so circuits
        are read afresh each time). Every request asks."""

    def bump_config_version(self) -> None: ...


class DatabaseState:
    def window_add(self, key: str, amount: int, *, limit: int, window: int = 60) -> float | None:
        now = time.time()
        start = int(now // window) * window
        wait = start + window - now
        for _ in range(3):
            if Counter.objects.filter(key=key, window=start, count__lte=limit - amount).update(
                    count=F("count") + amount):
                return None
            if amount > limit or Counter.objects.filter(key=key, window=start).exists():
                return wait
            try:
                with transaction.atomic():
                    Counter.objects.create(key=key, window=start, count=amount)
                return None
            except IntegrityError:  # another request created the window first: count in it
                continue
        return wait

    def lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        now, holder = time.time(), uuid.uuid4().hex
        Counter.objects.get_or_create(key=f"lock:{key}", window=0)
        with transaction.atomic():
            # One lease decision per key at a time: a row lock on PostgreSQL; SQLite's write lock does the same.
            Counter.objects.select_for_update().get(key=f"lock:{key}", window=0)
            Lease.objects.filter(key=key, expires_at__lte=now).delete()
            if Lease.objects.filter(key=key).count() >= limit:
                return None
            Lease.objects.create(key=key, holder=holder, expires_at=now + ttl)
        return holder

    def release(self, key: str, lease_id: str) -> None:
        Lease.objects.filter(holder=lease_id).delete()

    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        # The lease first: it can be given back if the window then refuses, where a count could not be taken back.
        lease_id = None
        if lease is not None:
            lease_id = self.lease(lease[0], limit=lease[1], ttl=lease[2])
            if lease_id is None:
                return Admission("lease")
        if window is not None:
            wait = self.window_add(window[0], window[1], limit=window[2])
            if wait is not None:
                if lease is not None and lease_id is not None:
                    self.release(lease[0], lease_id)
                return Admission("window", wait)
        return Admission(lease_id=lease_id)

    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        return {c.channel_id: CircuitView(c.failures, c.trips, c.open_until)
                for c in Circuit.objects.filter(channel_id__in=channel_ids)}

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        now = time.time()
        free = Q(probe_until__isnull=True) | Q(probe_until__lt=now)
        return bool(Circuit.objects.filter(free, channel_id=channel_id, open_until__lte=now)
                    .update(probe_until=now + ttl))

    # Every change to what a circuit looks like (a fault counted, a trip, a reset) moves the circuits version in the
    # same transaction, so a process may keep the circuits it read until that version moves (gateway/cache.py). A
    # claimed probe changes nothing a reader sees.
    def circuit_failed(self, channel_id: int) -> CircuitView:
        with transaction.atomic():
            circuit, _ = Circuit.objects.select_for_update().get_or_create(channel_id=channel_id)
            circuit.failures += 1
            if circuit.open_until is not None or circuit.failures >= settings.OPENOPEN8_BREAKER_THRESHOLD:
                circuit.trips += 1
                circuit.open_until = time.time() + cooldown(circuit.trips)
                circuit.failures, circuit.probe_until = 0, None
            circuit.save()
            _move_version(CIRCUITS)
        return CircuitView(circuit.failures, circuit.trips, circuit.open_until)

    def circuit_ok(self, channel_id: int) -> None:
        with transaction.atomic():
            deleted, _ = Circuit.objects.filter(channel_id=channel_id).delete()
            if deleted:
                _move_version(CIRCUITS)

    def versions(self) -> tuple[int, int | None]:
        # Every request sends it: written once, not built by the ORM each time (bench/RESULTS.md, run 37).
        with connection.cursor() as cursor:
            cursor.execute(_versions_sql(connection.vendor), [CONFIG, CIRCUITS])
            found = dict(cursor.fetchall())
        return found.get(CONFIG, 0), found.get(CIRCUITS, 0)

    def bump_config_version(self) -> None:
        _move_version(CONFIG)


# The names of the two version rows among the counters (window 0).
CONFIG, CIRCUITS = "config", "circuits"


def _move_version(key: str) -> None:
    try:
        Counter.objects.update_or_create(key=key, window=0, defaults={"count": new_version()})
    except IntegrityError:  # another process created the row at the same moment
        Counter.objects.filter(key=key, window=0).update(count=new_version())


@cache
def _versions_sql(vendor: str) -> str:
    quote = connection.ops.quote_name  # the fields' names are their columns'; "window" is a word of SQL's own
    key, window, count = quote("key"), quote("window"), quote("count")
    return f"SELECT {key}, {count} FROM {quote(Counter._meta.db_table)} WHERE {window} = 0 AND {key} IN (%s, %s)"


# A window (KEYS[1]: ARGV[1] counted against the limit ARGV[2], the key kept ARGV[3] s) and a lease (KEYS[2]: places
# expire at their score, ARGV[4] is now, ARGV[5] the limit, ARGV[6] the new place's expiry and ARGV[7] its holder, the
# key kept ARGV[8] s), both or neither; an empty key name skips that limit. Returns 0 (admitted), 1 (window), 2 (lease).
ADMIT = """
if KEYS[1] ~= '' and tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return 1
end
if KEYS[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 2 end
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
end
if KEYS[1] ~= '' then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 0
"""
CONFIG_VERSION, CIRCUITS_VERSION = "oo8:config-version", "oo8:circuits-version"


def _move_circuits_version(start: int, channel: int) -> str:
    """Lua moving the circuits version, KEYS[2] (from ARGV[start] if it is not there), publishing it on the channel
    ARGV[channel] and leaving it in ``version``."""
    return f"""
redis.call('SET', KEYS[2], ARGV[{start}], 'NX')
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[{channel}], 'circuits ' .. version)
"""


# Every change to a circuit's record (a fault counted, a trip, a probe claimed, a reset) moves the circuits version in
# the same atomic step, so a process may keep the circuits it read until that version moves (gateway/cache.py). It
# starts at a random number, so a Redis that restarted empty cannot count back up to a version a process still holds.
# The new version is published on the versions channel (for every process's VersionListener) and returned.
CLAIM_PROBE = """
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '-1')
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if open_until < 0 or open_until > tonumber(ARGV[1]) or probe_until >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'probe_until', ARGV[2])
""" + _move_circuits_version(3, 4) + "return version\n"
CIRCUIT_FAILED = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
if redis.call('HEXISTS', KEYS[1], 'open_until') == 1 or failures >= tonumber(ARGV[1]) then
  trips = trips + 1
  local wait = math.min(tonumber(ARGV[3]) * 2 ^ (trips - 1), tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'trips', trips, 'failures', 0, 'open_until', tonumber(ARGV[2]) + wait)
  redis.call('HDEL', KEYS[1], 'probe_until')
  failures = 0
end
""" + _move_circuits_version(5, 6) + """
return {failures, trips, redis.call('HGET', KEYS[1], 'open_until') or false, version}
"""
CIRCUIT_OK = "redis.call('DEL', KEYS[1])\n" + _move_circuits_version(1, 2) + "return version\n"
# The circuits version where there is none (a new Redis, or one emptied while processes listen: they still hold the
# old one, and learn the new one from its message).
START_CIRCUITS_VERSION = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then redis.call('PUBLISH', ARGV[2], 'circuits ' .. ARGV[1]) end
return redis.call('GET', KEYS[1])
"""


class RedisState:
    def __init__(self, url: str) -> None:
        import redis

        # Every request makes a few short Redis calls; more of them run at once than a worker has connections, so a
        # call waits for a free connection (up to OPENOPEN8_REDIS_POOL_TIMEOUT) instead of failing the request with
        # redis-py's "Too many connections" once its default of 100 is reached.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=settings.OPENOPEN8_REDIS_POOL_SIZE, timeout=settings.OPENOPEN8_REDIS_POOL_TIMEOUT,
            socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)
        self.redis = redis.Redis(connection_pool=pool)
        self._admit = self.redis.register_script(ADMIT)
        self._claim_probe = self.redis.register_script(CLAIM_PROBE)
        self._circuit_failed = self.redis.register_script(CIRCUIT_FAILED)
        self._circuit_ok = self.redis.register_script(CIRCUIT_OK)
        self._start_circuits_version = self.redis.register_script(START_CIRCUITS_VERSION)
        # Pub/sub channels are not kept apart by database number: the number goes in the name.
        self.channel = f"{VERSIONS_CHANNEL}:{pool.connection_kwargs.get('db', 0)}"
        self.url = url
        self._listener: VersionListener | None = None
        self._listener_lock = threading.Lock()

    def window_add(self, key: str, amount: int, *, limit: int, window: int = 60) -> float | None:
        admitted = self.admit(window=(key, amount, limit), lease=None, seconds=window)
        return admitted.wait if admitted.refused else None

    def lease(self, key: str, *, limit: int, ttl: float) -> str | None:
        return self.admit(window=None, lease=(key, limit, ttl)).lease_id

    def admit(self, *, window: Window | None, lease: LeaseAsk | None, seconds: int = 60) -> Admission:
        now, holder = time.time(), uuid.uuid4().hex
        start = int(now // seconds) * seconds
        window_key, amount, limit = (f"oo8:{window[0]}:{start}", window[1], window[2]) if window else ("", 0, 0)
        lease_key, places, ttl = (f"oo8:lease:{lease[0]}", lease[1], lease[2]) if lease else ("", 0, 0.0)
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

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        now = time.time()
        version = self._claim_probe(keys=[f"oo8:circuit:{channel_id}", CIRCUITS_VERSION],
                                    args=[now, now + ttl, new_version(), self.channel])
        if version:
            self._heard(circuits=int(version))
        return bool(version)

    def circuit_failed(self, channel_id: int) -> CircuitView:
        failures, trips, open_until, version = self._circuit_failed(
            keys=[f"oo8:circuit:{channel_id}", CIRCUITS_VERSION],
            args=[settings.OPENOPEN8_BREAKER_THRESHOLD, time.time(), settings.OPENOPEN8_BREAKER_COOLDOWN,
                  settings.OPENOPEN8_BREAKER_MAX_COOLDOWN, new_version(), self.channel])
        self._heard(circuits=int(version))
        return CircuitView(int(failures), int(trips), float(open_until) if open_until else None)

    def circuit_ok(self, channel_id: int) -> None:
        version = self._circuit_ok(keys=[f"oo8:circuit:{channel_id}", CIRCUITS_VERSION],
                                   args=[new_version(), self.channel])
        self._heard(circuits=int(version))

    def versions(self) -> tuple[int, int | None]:
        """From this process's listener when it is listening (no round trip), else read from Redis."""
        listener = self._listener
        if listener is None or listener.pid != os.getpid():  # the first call in this process
            with self._listener_lock:
                if self._listener is None or self._listener.pid != os.getpid():
                    self._listener = VersionListener(self.url, self.channel, read=self.read_versions)
                    self._listener.start()
                listener = self._listener
        known = listener.known()
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

    def listening(self) -> bool:
        """True while this process's listener holds both versions and has heard from Redis lately."""
        return self._listener is not None and self._listener.known() is not None

    def _heard(self, **versions: int) -> None:
        # What this process changed it knows at once, before its own message comes back.
        if self._listener is not None:
            self._listener.heard(**versions)


# Every change to either version is published on this channel (with the database number appended) as
# ``config <version>`` or ``circuits <version>``.
VERSIONS_CHANNEL = "oo8:versions"
# The listener pings when it has heard nothing for LISTEN_PING_S; the process trusts what it holds for
# LISTEN_TRUST_S after it last heard from Redis, and past that each request reads the versions itself.
LISTEN_PING_S, LISTEN_TRUST_S = 1.0, 3.0


class VersionListener:
    """This process's copy of the configuration and circuits versions, kept current by a subscription to the channel
    every change to them is published on, so a request reads them without a round trip to Redis: that read was a
    tenth of a request's CPU (bench/RESULTS.md).

    A change made elsewhere reaches the process as soon as its message does (well under a millisecond on one
    network) instead of at the next request's read; one made in this process counts at once. Whenever the copy
    cannot be trusted (not yet subscribed, the connection lost, Redis silent for LISTEN_TRUST_S), ``known()`` is
    ``None`` and requests read the versions from Redis as before. A thread (a greenlet under gevent) per process.
    """

    def __init__(self, url: str, channel: str, *, read: Callable[[], tuple[int, int]]) -> None:
        self.url, self.channel, self.read, self.pid = url, channel, read, os.getpid()
        self.config: int | None = None
        self.circuits: int | None = None
        self.last_heard = -math.inf

    def start(self) -> None:
        threading.Thread(target=self._run, name="openopen8-versions", daemon=True).start()

    def known(self) -> tuple[int, int] | None:
        config, circuits = self.config, self.circuits
        if config is None or circuits is None or time.monotonic() - self.last_heard >= LISTEN_TRUST_S:
            return None
        return config, circuits

    def heard(self, *, config: int | None = None, circuits: int | None = None) -> None:
        # Each version is its own attribute, set whole: the listener and request threads never undo each other.
        if config is not None:
            self.config = config
        if circuits is not None:
            self.circuits = circuits

    def _run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=LISTEN_TRUST_S)
        retrying = False
        while True:
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]
            try:
                self._listen(pubsub)
            except Exception:  # Redis went away or answered oddly: requests read for themselves meanwhile
                if self.last_heard > -math.inf or not retrying:  # once an outage, not at every retry
                    log.warning("the versions subscription failed; requests read the versions from Redis until it is "
                                "back", exc_info=True)
                retrying = True
            finally:
                self.last_heard, self.config, self.circuits = -math.inf, None, None
                pubsub.close()
            time.sleep(random.uniform(0.5, 1.5))

    def _listen(self, pubsub: Any) -> None:
        pubsub.subscribe(self.channel)
        while (message := pubsub.get_message(timeout=LISTEN_TRUST_S)) is None or message["type"] != "subscribe":
            if message is None:
                raise ConnectionError("no subscription confirmed")
        # Subscribed: every change from here on is heard, so what is read now can be kept up to date. A message
        # already waiting may be older than this read; the ones after it bring the versions back up to date.
        self.config, self.circuits = self.read()
        self.last_heard = time.monotonic()
        while True:
            message = pubsub.get_message(timeout=LISTEN_PING_S)
            if message is None:
                if time.monotonic() - self.last_heard >= LISTEN_TRUST_S:
                    raise ConnectionError(f"Redis was silent for {LISTEN_TRUST_S:g} s")
                pubsub.ping("oo8")
                continue
            self.last_heard = time.monotonic()
            if message["type"] == "message":
                kind, version = message["data"].split()
                self.heard(**{kind.decode(): int(version)})


@cache
def _state_for(redis_url: str) -> Any:
    return RedisState(redis_url) if redis_url else DatabaseState()


def shared_state() -> SharedState:
    """The process's shared-state backend: Redis when REDIS_URL is set, else the database."""
    state: SharedState = _state_for(settings.REDIS_URL)
    return state
