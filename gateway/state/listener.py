"""This process's copy of the configuration and circuits versions, kept current by a subscription to the Redis
channel every change to them is published on."""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Every change to either version is published on this channel (with the database number appended) as
# ``config <version>`` or ``circuits <version>``.
VERSIONS_CHANNEL = "oo8:versions"
# The listener pings when it has heard nothing for LISTEN_PING_S; the process trusts what it holds for
# LISTEN_TRUST_S after it last heard from Redis, and past that each request reads the versions itself.
LISTEN_PING_S, LISTEN_TRUST_S = 1.0, 3.0


class VersionListener:
    """This process's copy of the configuration and circuits versions, kept current by a subscription to the channel
    every change to them is published on, so a request reads them without a round trip to Redis (bench/RESULTS.md).

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
            except Exception as error:  # Redis went away or answered oddly: requests read for themselves meanwhile
                if self.last_heard > -math.inf or not retrying:  # once an outage, not at every retry; a line
                    log.warning("the versions subscription failed (%s: %s); requests read the versions themselves "
                                "until it is back", type(error).__name__, str(error)[:200])
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
