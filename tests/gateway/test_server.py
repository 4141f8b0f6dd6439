"""The gateway as operators run it: gunicorn with gunicorn.conf.py (gevent workers), on this run's database (and
Redis, where REDIS_URL is set), against a provider over real HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from django.test import TransactionTestCase

from gateway.models import UsageLog
from tests.factories import make_channel, make_token, openai_images, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded
from tests.processes import start_gateway


class ProductionServerTests(TransactionTestCase):
    def test_one_worker_holds_many_slow_requests_at_once_and_records_each(self) -> None:
        # A provider that takes a second: one worker must wait on all of them together, not one after another.
        in_flight, most = 0, 0
        lock = threading.Lock()

        def slow(_request: Recorded) -> dict[str, Any]:
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            time.sleep(1.0)
            with lock:
                in_flight -= 1
            return openai_images()

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
            self.assertEqual(most, clients)
            # Hosted URLs work through the same worker.
            url = next(a.json()["data"][0]["url"] for a in answers if "url" in a.json()["data"][0])
            self.assertEqual(requests.get(url, timeout=10).content, png_bytes())
        logs = UsageLog.objects.all()
        self.assertEqual(len(logs), clients)
        self.assertEqual({log.status for log in logs}, {UsageLog.Status.SUCCESS})
