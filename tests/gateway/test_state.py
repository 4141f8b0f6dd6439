"""The shared state backends (gateway/state/): limits, circuits, and their connections."""

from __future__ import annotations

import threading
import time
import unittest
import uuid

from django.conf import settings
from django.test import TestCase, override_settings

from gateway.state import LeaseAsk, Window, shared_state
from gateway.state.database import DatabaseState
from gateway.state.redis import RedisState
from tests.base import clear_of_minute_boundary
from tests.factories import make_channel


class AdmissionTests(TestCase):
    def test_a_request_refused_by_one_limit_uses_up_nothing_of_the_other(self) -> None:
        for state in {type(s): s for s in (DatabaseState(), shared_state())}.values():  # Redis too, where configured
            with self.subTest(type(state).__name__):
                clear_of_minute_boundary()
                rpm, places = Window(f"rpm:{uuid.uuid4().hex}", 1, 2), f"inflight:{uuid.uuid4().hex}"
                first = state.admit(window=rpm, lease=LeaseAsk(places, 1, 30))
                self.assertEqual((first.refused, bool(first.lease_id)), (None, True))
                # The one place is taken: refused, and not counted against the minute's two.
                self.assertEqual(state.admit(window=rpm, lease=LeaseAsk(places, 1, 30)).refused, "lease")
                state.release(places, str(first.lease_id))
                self.assertIsNone(state.admit(window=rpm, lease=LeaseAsk(places, 2, 30)).refused)  # the second of two
                full = state.admit(window=rpm, lease=LeaseAsk(places, 2, 30))
                self.assertEqual(full.refused, "window")
                self.assertTrue(0 < full.wait <= 60)
                # The request the window refused took no place: one is still free of two.
                self.assertIsNotNone(state.admit(window=None, lease=LeaseAsk(places, 2, 30)).lease_id)


class DatabaseStateTests(TestCase):
    """The database backend on its own (the suite runs the Redis one wherever REDIS_URL is set)."""

    def test_windows_leases_and_circuits(self) -> None:
        state = DatabaseState()
        self.assertIsNone(state.admit(window=Window("w", 2, 3), lease=None).refused)
        self.assertIsNone(state.admit(window=Window("w", 1, 3), lease=None).refused)
        full = state.admit(window=Window("w", 1, 3), lease=None)
        self.assertTrue(full.refused == "window" and 0 < full.wait <= 60)
        first = state.admit(window=None, lease=LeaseAsk("l", 1, 0.2)).lease_id
        self.assertIsNotNone(first)
        self.assertIsNone(state.admit(window=None, lease=LeaseAsk("l", 1, 0.2)).lease_id)
        time.sleep(0.25)  # a lease whose worker died lapses
        self.assertIsNotNone(state.admit(window=None, lease=LeaseAsk("l", 1, 5)).lease_id)
        channel = make_channel(base_url="http://127.0.0.1:9")
        with override_settings(OPENOPEN8_BREAKER_THRESHOLD=2, OPENOPEN8_BREAKER_COOLDOWN=0.1):
            state.circuit_failed(channel.pk)
            self.assertEqual(state.circuits([channel.pk])[channel.pk].state(time.time()), "closed")
            state.circuit_failed(channel.pk)
            self.assertEqual(state.circuits([channel.pk])[channel.pk].state(time.time()), "open")
            time.sleep(0.12)
            self.assertTrue(state.claim_probe(channel.pk, ttl=5))
            self.assertFalse(state.claim_probe(channel.pk, ttl=5))  # only one probe at a time
            state.circuit_ok(channel.pk)
            self.assertEqual(state.circuits([channel.pk]), {})


class RedisPoolTests(TestCase):
    def test_a_process_keeps_its_redis_connections_bounded_and_calls_beyond_them_wait(self) -> None:
        # Hundreds of requests in flight in one worker must neither open a Redis connection each nor fail with
        # "Too many connections" when they outnumber the pool: they take turns on the pool's connections.
        if not settings.REDIS_URL:
            raise unittest.SkipTest("needs REDIS_URL, as .ci/run sets it")
        name = f"oo8-pool-test-{time.monotonic_ns()}"
        url = settings.REDIS_URL + ("&" if "?" in settings.REDIS_URL else "?") + f"client_name={name}"
        with override_settings(OPENOPEN8_REDIS_POOL_SIZE=2):
            state = RedisState(url)
        self.addCleanup(state.redis.connection_pool.disconnect)
        errors: list[BaseException] = []
        barrier = threading.Barrier(24)

        def one() -> None:
            barrier.wait()
            try:
                for _ in range(10):
                    state.admit(window=Window("pool-test", 1, 1000), lease=None)
            except BaseException as error:  # noqa: BLE001 - collected for the assertion below
                errors.append(error)

        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        # All 240 calls were counted: the window of 240 is full.
        self.assertEqual(state.admit(window=Window("pool-test", 1, 240), lease=None).refused, "window")
        clients = [c for c in state.redis.client_list() if c.get("name") == name]
        self.assertLessEqual(len(clients), 2)
