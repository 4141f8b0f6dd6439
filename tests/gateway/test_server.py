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
        logs = UsageLog.objects.all()
        self.assertEqual(len(logs), clients)
        self.assertEqual({log.status for log in logs}, {UsageLog.Status.SUCCESS})

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
