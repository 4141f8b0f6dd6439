"""Real faults against the gateway as operators run it (gunicorn with gunicorn.conf.py, two workers): PostgreSQL
crashing or stopping, SIGTERM during an outage, a worker killed, Redis away, clients that hang up. Each ends with the
money check: for the token, spent = the sum of its rows' costs = the price of the images clients received (plus,
by the stated rule, those made for clients that left), no row pending, one row per request.

The database faults stop the machine's PostgreSQL (the suite's own database) and start it again in a cleanup;
they run where the suite runs on PostgreSQL with Redis, as .ci/run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Any

import requests
from django.conf import settings
from django.db import connection
from django.test import TransactionTestCase

from gateway.models import ApiToken, UsageLog
from tests.base import eventually
from tests.factories import make_channel, make_price, make_token, openai_images
from tests.fake_upstream import FakeUpstream
from tests.processes import ROOT, MachinePostgres, database_url, gateway_process, start_redis, workers_of

PRICE = 16000  # µUSD an image (dall-e-2 256x256)
BODY = {"model": "dall-e-2", "prompt": "a lighthouse", "size": "256x256", "response_format": "b64_json"}


class Faults(TransactionTestCase):
    """A gateway of two workers on the suite's database, its log kept for the test to read."""

    def setUp(self) -> None:
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        self.up = self.enterContext(FakeUpstream())
        make_channel(base_url=self.up.url, models="dall-e-2")
        self.data = tempfile.mkdtemp()
        self.log = Path(self.data) / "gateway.log"

    def gateway(self, **env: str) -> tuple[str, subprocess.Popen[Any]]:
        return gateway_process(self.addCleanup, log=self.log, data=self.data, OPENOPEN8_WORKERS="2",
                               OPENOPEN8_REQUEST_DEADLINE="20", **env)

    def post(self, base: str, key: str, *, timeout: float = 60, **extra: Any) -> requests.Response:
        return requests.post(f"{base}/v1/images/generations", json={**BODY, **extra}, timeout=timeout,
                             headers={"Authorization": f"Bearer {key}"})

    def in_parallel(self, count: int, call: Any) -> list[Any]:
        """``call(i)`` for ``i`` in range(count) at once; each result, or the exception it raised."""
        results: list[Any] = [None] * count

        def one(i: int) -> None:
            try:
                results[i] = call(i)
            except Exception as error:  # a client that gave up, say
                results[i] = error

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def in_parallel_started(self, count: int, call: Any) -> Any:
        """``in_parallel`` in the background; returns the function that waits for its results."""
        results: list[Any] = []
        thread = threading.Thread(target=lambda: results.extend(self.in_parallel(count, call)))
        thread.start()

        def wait() -> list[Any]:
            thread.join()
            return results

        return wait

    def sweep(self, **env: str) -> str:
        """``manage.py sweep`` on this node (its journal), as an operator runs it."""
        done = subprocess.run([sys.executable, "manage.py", "sweep"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "DATABASE_URL": database_url(), "OPENOPEN8_DATA_DIR": self.data,
                                   **env}, timeout=120, check=False)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return done.stdout

    def assert_money(self, token: ApiToken, *, images: int, requests_sent: list[str] | None = None) -> None:
        """The money check: nothing pending, spent = the rows' costs = ``images`` at the price; one row for each
        request id in ``requests_sent``."""
        rows = UsageLog.objects.filter(token=token)
        self.assertEqual(list(rows.filter(status="pending").values_list("request_id", flat=True)), [])
        costs = sum(rows.values_list("cost_micros", flat=True))
        self.assertEqual(costs, images * PRICE)
        if token.budget_micros is not None:  # a token without a budget keeps no total: its rows are its ledger
            self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, costs)
        if requests_sent is not None:
            self.assertEqual(sorted(rows.values_list("request_id", flat=True)), sorted(requests_sent))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def images_in(answers: list[Any]) -> int:
    return sum(len(a.json()["data"]) for a in answers if isinstance(a, requests.Response) and a.status_code == 200)


class DatabaseFaultTests(Faults):
    def setUp(self) -> None:
        self.pg = MachinePostgres()
        if not self.pg.available() or not settings.REDIS_URL:
            raise unittest.SkipTest("needs the machine's PostgreSQL (DATABASE_URL) and REDIS_URL, as .ci/run sets")
        super().setUp()
        self.addCleanup(self.pg.start)  # whatever happens, the suite's database runs again

    def test_a_graceful_stop_during_a_database_outage_bills_every_answered_request(self) -> None:
        token, key = make_token(name="outage", budget="10.00")
        self.up.respond(200, openai_images(1), delay=3.0)
        base, master = self.gateway(REDIS_URL=settings.REDIS_URL)
        clients = self.in_parallel_started(20, lambda i: self.post(base, key))
        eventually(lambda: len(self.up.requests) == 20, within=20)  # every pending row is written by now
        self.pg.stop("immediate")
        master.send_signal(signal.SIGTERM)
        answers = clients()
        self.assertEqual(master.wait(60), 0)
        self.assertEqual([a.status_code for a in answers], [200] * 20)  # delivered though the database is away
        self.assertIn("they stay in the journal", self.log_text())
        self.pg.start()
        self.sweep()  # the next run on this node writes the journal: here, the operator's sweep
        self.assert_money(token, images=20, requests_sent=[a.headers["x-request-id"] for a in answers])

    def test_a_crash_under_load_loses_no_row_and_charges_each_delivered_image_once(self) -> None:
        token, key = make_token(name="crash", budget="100.00")
        self.up.respond(200, openai_images(1), delay=0.2)
        base, _master = self.gateway(REDIS_URL=settings.REDIS_URL)
        for _ in range(8):  # each worker knows the token before the crash
            self.assertEqual(self.post(base, key).status_code, 200)
        answers: list[Any] = []
        stop = time.monotonic() + 12

        def client(_i: int) -> None:
            while time.monotonic() < stop:
                try:
                    answers.append(self.post(base, key, timeout=30))
                except requests.RequestException as error:
                    answers.append(error)

        load = threading.Thread(target=self.in_parallel, args=(8, client))
        load.start()
        time.sleep(3)
        self.pg.stop("immediate")
        during = requests.get(f"{base}/readyz", timeout=5)  # said within a second, not the pool's wait
        time.sleep(2)
        self.pg.start()
        load.join()
        self.assertEqual(during.status_code, 503, during.text)
        statuses = {a.status_code if isinstance(a, requests.Response) else type(a).__name__ for a in answers}
        self.assertLessEqual(statuses, {200, 503}, statuses)  # never a 500, never a dropped connection
        refused = [a for a in answers if a.status_code == 503]
        self.assertTrue(refused, "the crash was not seen")
        self.assertTrue(all(a.headers.get("Retry-After") for a in refused))
        self.assertEqual(refused[0].json()["error"]["code"], "database_unavailable")
        eventually(lambda: not UsageLog.objects.filter(token=token, status="pending").exists(), within=30)
        self.assert_money(token, images=8 + images_in(answers), requests_sent=None)
        ids = [a.headers["x-request-id"] for a in answers]
        self.assertEqual(UsageLog.objects.filter(token=token, request_id__in=ids).count(), len(ids))



class WorkerFaultTests(Faults):
    def test_a_killed_workers_places_come_back_within_seconds_and_its_requests_are_refunded(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("needs PostgreSQL (DATABASE_URL), as .ci/run sets it")
        token, key = make_token(name="killed", budget="1.00", max_in_flight=2)
        self.up.queue(200, openai_images(1), delay=30)
        self.up.queue(200, openai_images(1), delay=30)
        self.up.respond(200, openai_images(1))
        base, master = gateway_process(self.addCleanup, log=self.log, data=self.data, OPENOPEN8_WORKERS="1",
                                       OPENOPEN8_LEASE_TTL="3", OPENOPEN8_REQUEST_DEADLINE="40",
                                       **({"REDIS_URL": settings.REDIS_URL} if settings.REDIS_URL else {}))
        stuck = self.in_parallel_started(2, lambda i: self.post(base, key))
        eventually(lambda: len(self.up.requests) == 2, within=20)
        refused = self.post(base, key)
        self.assertEqual(refused.status_code, 429)
        self.assertLessEqual(int(refused.headers["Retry-After"]), 3)
        (worker,) = workers_of(master)
        os.kill(worker, signal.SIGKILL)
        self.assertEqual({type(a).__name__ for a in stuck()}, {"ConnectionError"})
        eventually(lambda: len(workers_of(master)) == 1 and workers_of(master) != [worker], within=30)
        served_at = None
        for _ in range(60):  # the dead worker's places lapse within the lease's 3 s, not the deadline's 100 s
            answer = self.post(base, key)
            if answer.status_code == 200:
                served_at = time.monotonic()
                break
            self.assertEqual(answer.status_code, 429)
            time.sleep(0.25)
        self.assertIsNotNone(served_at, "the places never came back")
        # The two requests the worker died with are swept and refunded; the one served is charged.
        self.sweep(OPENOPEN8_REQUEST_DEADLINE="0.01", OPENOPEN8_SWEEP_GRACE="0.01")
        self.assertEqual(UsageLog.objects.filter(token=token, error_code="abandoned").count(), 2)
        self.assert_money(token, images=1)


class RedisFaultTests(Faults):
    def test_with_redis_away_unlimited_keys_are_served_limited_ones_hear_503_and_each_request_has_its_row(self) -> None:
        redis_url, redis = start_redis(self.addCleanup)
        token, key = make_token(name="free")
        _limited, limited_key = make_token(name="limited", requests_per_minute=1000)
        self.up.respond(200, openai_images(1))
        base, _master = self.gateway(REDIS_URL=redis_url)
        self.assertEqual(self.post(base, limited_key).status_code, 200)
        redis.terminate()
        redis.wait(10)
        ready = requests.get(f"{base}/readyz", timeout=5)
        self.assertEqual((ready.status_code, ready.json()["checks"]["redis"][:5]), (503, "error"))
        served = [self.post(base, key) for _ in range(20)]
        self.assertEqual([a.status_code for a in served], [200] * 20)
        refused = self.post(base, limited_key)
        self.assertEqual((refused.status_code, refused.json()["error"]["code"]), (503, "limits_unavailable"))
        self.assertTrue(refused.headers["Retry-After"])
        ids = [a.headers["x-request-id"] for a in served]
        eventually(lambda: UsageLog.objects.filter(request_id__in=ids, status="success").count() == 20)
        # The refusal's row is written after its answer, like every row: wait for it too.
        eventually(lambda: UsageLog.objects.filter(request_id=refused.headers["x-request-id"],
                                                   http_status=503).exists())
        log = self.log_text()
        self.assertNotIn("Traceback", log)
        self.assertLessEqual(log.count("Redis does not answer"), 2)  # a line a worker for the outage
        # Back again: limits count again.
        start_redis(self.addCleanup, port=int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        eventually(lambda: self.post(base, limited_key).status_code == 200, within=15)
        self.assertIn("Redis answers again", self.log_text())
        self.assert_money(token, images=20, requests_sent=ids)


class DisconnectTests(Faults):
    def gone_after_half_a_second(self, base: str, key: str) -> None:
        with self.assertRaises(requests.ReadTimeout):
            self.post(base, key, timeout=0.5)

    def test_a_client_that_leaves_before_the_provider_answers_is_recorded_and_charged_by_default(self) -> None:
        token, key = make_token(name="impatient", budget="1.00")
        self.up.respond(200, openai_images(1), delay=2.0)
        base, _master = self.gateway()
        self.gone_after_half_a_second(base, key)
        eventually(lambda: UsageLog.objects.filter(token=token, status="success").exists(), within=15)
        row = UsageLog.objects.get(token=token)
        self.assertEqual((row.client_gone, row.images_returned, row.cost_micros), ("before_provider", 1, PRICE))
        assert row.client_gone_at is not None
        self.assertGreater(row.client_gone_at, row.created_at)
        self.assert_money(token, images=1)

    def test_the_operator_can_choose_not_to_charge_for_images_a_departed_client_never_received(self) -> None:
        token, key = make_token(name="impatient", budget="1.00")
        self.up.respond(200, openai_images(1), delay=2.0)
        base, _master = self.gateway(OPENOPEN8_CHARGE_DEPARTED_CLIENTS="false")
        self.gone_after_half_a_second(base, key)
        self.assertEqual(self.post(base, key).status_code, 200)  # one that stayed is charged
        eventually(lambda: UsageLog.objects.filter(token=token, status="success").count() == 2, within=15)
        gone = UsageLog.objects.get(token=token, client_gone="before_provider")
        self.assertEqual((gone.images_returned, gone.cost_micros, gone.reserved_micros), (1, 0, 0))
        self.assert_money(token, images=1)
