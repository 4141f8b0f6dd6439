"""The gateway as operators run it: gunicorn with gunicorn.conf.py (gevent workers), on this run's database (and
Redis, where REDIS_URL is set), against a provider over real HTTP."""

from __future__ import annotations

import io
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Any

import requests
from django.db import connection, transaction
from django.test import TransactionTestCase
from PIL import Image

from gateway.models import ApiToken, UsageLog
from tests.base import eventually
from tests.factories import make_channel, make_price, make_token, openai_images, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded
from tests.processes import gateway_process, start_gateway


class SlowProvider:
    """An answer that takes ``seconds``, counting how many requests the provider held at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.in_flight, self.most = seconds, 0, 0
        self.lock = threading.Lock()

    def __call__(self, _request: Recorded) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(self.seconds)
        with self.lock:
            self.in_flight -= 1
        return openai_images()


class ProductionServerTests(TransactionTestCase):
    def test_one_worker_holds_many_slow_requests_at_once_and_records_each(self) -> None:
        # A provider that takes a second: one worker must wait on all of them together, not one after another.
        slow = SlowProvider(1.0)
        clients = 24
        _token, key = make_token(name="many")
        with FakeUpstream() as up:
            up.respond(200, slow)
            make_channel(base_url=up.url, models="dall-e-2")
            gateway = start_gateway(self.addCleanup)
            answers: list[requests.Response] = []
            barrier = threading.Barrier(clients)

            def one(i: int) -> None:
                barrier.wait()
                answers.append(requests.post(
                    f"{gateway}/v1/images/generations", timeout=60, headers={"Authorization": f"Bearer {key}"},
                    json={"model": "dall-e-2", "prompt": f"a lighthouse {i}", "size": "256x256",
                          "response_format": "url" if i % 2 else "b64_json"}))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual([a.text for a in answers if a.status_code != 200], [])
            self.assertEqual(len(answers), clients)
            self.assertEqual(slow.most, clients)
            # Hosted URLs work through the same worker.
            url = next(a.json()["data"][0]["url"] for a in answers if "url" in a.json()["data"][0])
            self.assertEqual(requests.get(url, timeout=10).content, png_bytes())
        # Each row is completed, on PostgreSQL just after its answer (UsageAfterAnswerTests).
        eventually(lambda: UsageLog.objects.filter(status=UsageLog.Status.SUCCESS).count() == clients)
        self.assertEqual(UsageLog.objects.count(), clients)

    def test_n_images_from_a_one_image_provider_are_asked_for_in_parallel(self) -> None:
        # Seedream (ark) makes one image a call: n=3 is three provider calls, made at once inside the worker.
        slow = SlowProvider(0.5)
        _token, key = make_token(name="three")
        with FakeUpstream() as up:
            up.respond(200, slow)
            make_channel(kind="ark", base_url=up.url, models="seedream")
            gateway = start_gateway(self.addCleanup)
            answer = requests.post(f"{gateway}/v1/images/generations", timeout=60,
                                   headers={"Authorization": f"Bearer {key}"},
                                   json={"model": "seedream", "prompt": "a", "n": 3, "response_format": "b64_json"})
            self.assertEqual(answer.status_code, 200, answer.text)
            self.assertEqual(len(answer.json()["data"]), 3)
            self.assertEqual((len(up.requests), slow.most), (3, 3))


class SqliteUnderLoadTests(TransactionTestCase):
    """The embedded default under load: two gevent workers writing to one SQLite file."""

    def setUp(self) -> None:
        if connection.vendor != "sqlite":
            raise unittest.SkipTest("SQLite only, the embedded default (DATABASE_URL unset)")

    def test_32_clients_at_once_on_two_workers_all_succeed_and_every_row_and_cent_is_written(self) -> None:
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        budgeted, budget_key = make_token(name="budget", budget="100")  # each request holds its price: a transaction
        _free, free_key = make_token(name="free")
        clients, each = 32, 10
        log = Path(tempfile.mkdtemp()) / "gunicorn.log"
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="dall-e-2")
            gateway = start_gateway(self.addCleanup, OPENOPEN8_WORKERS="2", log=log)
            failures: list[str] = []
            barrier = threading.Barrier(clients)

            def client(i: int) -> None:
                barrier.wait()
                with requests.Session() as session:
                    for _ in range(each):
                        answer = session.post(
                            f"{gateway}/v1/images/generations", timeout=60,
                            headers={"Authorization": f"Bearer {budget_key if i % 2 else free_key}"},
                            json={"model": "dall-e-2", "prompt": "a", "size": "256x256", "response_format": "b64_json"})
                        if answer.status_code != 200:
                            failures.append(answer.text)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.assertEqual(failures, [])
        rows = UsageLog.objects.values_list("status", flat=True)
        self.assertEqual((len(rows), set(rows)), (clients * each, {UsageLog.Status.SUCCESS}))
        self.assertEqual(ApiToken.objects.get(pk=budgeted.pk).spent_micros, 16000 * clients * each // 2)
        written = log.read_text(errors="replace")
        self.assertIn("Booting worker", written)
        self.assertNotIn("database is locked", written)


class UsageAfterAnswerTests(TransactionTestCase):
    """On PostgreSQL a worker answers first and writes the completed usage row just after, so the answer does not wait
    for the row's commit; the row is written as soon as the database takes it, also by a worker that is stopping."""

    def setUp(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        self.token, self.key = make_token(name="later", budget="1.00")
        self.release = threading.Event()
        self.answers: list[requests.Response] = []

    def provider(self, _request: Recorded) -> dict[str, Any]:
        self.release.wait(30)
        return openai_images(1)  # of the two asked for: the completion gives one image's hold back

    def ask(self, gateway: str) -> threading.Thread:
        def one() -> None:
            self.answers.append(requests.post(
                f"{gateway}/v1/images/generations", timeout=30, headers={"Authorization": f"Bearer {self.key}"},
                json={"model": "dall-e-2", "prompt": "a", "n": 2, "size": "256x256", "response_format": "b64_json"}))

        thread = threading.Thread(target=one)
        thread.start()
        return thread

    def answered_while_the_row_is_locked(self, up: FakeUpstream, thread: threading.Thread) -> None:
        """With the pending row locked (its completion cannot commit), the client still gets its answer."""
        eventually(lambda: len(up.requests) == 1)
        row = UsageLog.objects.select_for_update().get()
        self.assertEqual((row.status, row.reserved_micros), (UsageLog.Status.PENDING, 32000))
        self.release.set()
        thread.join(10)
        self.assertEqual([(a.status_code, len(a.json()["data"])) for a in self.answers], [(200, 1)])
        self.assertEqual(ApiToken.objects.get(pk=self.token.pk).spent_micros, 32000)  # both images still held

    def assert_completed(self) -> None:
        eventually(lambda: UsageLog.objects.get().status == UsageLog.Status.SUCCESS)
        row = UsageLog.objects.get()
        self.assertEqual((row.images_returned, row.cost_micros, row.reserved_micros), (1, 16000, 0))
        self.assertEqual(ApiToken.objects.get(pk=self.token.pk).spent_micros, 16000)

    def test_the_answer_does_not_wait_for_the_usage_row_which_follows_once_the_database_takes_it(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, self.provider)
            make_channel(base_url=up.url, models="dall-e-2")
            thread = self.ask(start_gateway(self.addCleanup))
            with transaction.atomic():
                self.answered_while_the_row_is_locked(up, thread)
                self.assertEqual(UsageLog.objects.get().status, UsageLog.Status.PENDING)
        self.assert_completed()

    def test_a_worker_stopped_after_answering_writes_the_row_before_it_exits(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, self.provider)
            make_channel(base_url=up.url, models="dall-e-2")
            gateway, master = gateway_process(self.addCleanup)
            thread = self.ask(gateway)
            with transaction.atomic():
                self.answered_while_the_row_is_locked(up, thread)
                master.terminate()  # a graceful stop, as at a deploy
                # A worker with nothing in flight is gone within about 6 s (its database pool waits 5 s at exit for
                # the connection the blocked write holds). This one waits for its row.
                time.sleep(7)
                self.assertIsNone(master.poll())
        self.assertEqual(master.wait(10), 0)
        self.assert_completed()


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


class InputImageTests(TransactionTestCase):
    def test_edits_of_decompression_bombs_leave_the_workers_memory_and_healthz_alone(self) -> None:
        # A 6000x6000 PNG of zeros: a few hundred kB that decodes to 144 MB.
        bomb = io.BytesIO()
        Image.new("RGBA", (6000, 6000)).save(bomb, "PNG")
        _token, key = make_token(name="bombs")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            gateway, master = gateway_process(self.addCleanup)
            worker = int(Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()[0])
            requests.get(f"{gateway}/healthz", timeout=5)
            before = peak_rss_kib(worker)
            health: list[float] = []
            answers: list[int] = []

            def edit(images: int) -> None:
                files = [("image[]", (f"{i}.png", bomb.getvalue(), "image/png")) for i in range(images)]
                answers.append(requests.post(f"{gateway}/v1/images/edits", timeout=120, files=files,
                                             headers={"Authorization": f"Bearer {key}"},
                                             data={"model": "gpt-image-1.5", "prompt": "p"}).status_code)

            edits = [threading.Thread(target=edit, args=(n,)) for n in (1, 2, 16, 16)]
            for t in edits:
                t.start()
            while any(t.is_alive() for t in edits):
                started = time.monotonic()
                requests.get(f"{gateway}/healthz", timeout=10)
                health.append(time.monotonic() - started)
                time.sleep(0.05)
            for t in edits:
                t.join()
        # Two bombs fit the request's pixel limit and go through; sixteen are refused once the first two are checked.
        self.assertEqual(sorted(answers), [200, 200, 400, 400])
        self.assertLess(peak_rss_kib(worker) - before, 60 * 1024)  # decoding one whole would add 144 MB
        self.assertLess(max(health), 2.0)  # generous: bench/RESULTS.md has the measured numbers
