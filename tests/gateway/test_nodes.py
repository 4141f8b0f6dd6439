"""Several nodes on shared infrastructure: two gateway processes on their own ports sharing PostgreSQL, Redis and an
S3-compatible object store (moto's server). Runs where the suite runs on PostgreSQL with Redis (as .ci/run does)."""

from __future__ import annotations

import threading
import unittest
from typing import Any

import boto3  # type: ignore[import-untyped]
import requests
from django.conf import settings
from django.db import connection
from django.test import LiveServerTestCase

from gateway.models import ApiToken, UsageLog
from tests.base import clear_of_minute_boundary, eventually
from tests.factories import make_channel, make_price, make_token
from tests.fake_upstream import FakeUpstream
from tests.processes import start_gateway, start_s3

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class TwoNodeTests(LiveServerTestCase):
    def setUp(self) -> None:
        if connection.vendor != "postgresql" or not settings.REDIS_URL:
            raise unittest.SkipTest("needs DATABASE_URL (PostgreSQL) and REDIS_URL, as .ci/run sets them")
        s3 = start_s3(self.addCleanup)
        bucket = f"oo8-{id(self)}"
        client = boto3.client("s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        env = {**S3_ENV, "REDIS_URL": settings.REDIS_URL, "OPENOPEN8_S3_BUCKET": bucket,
               "OPENOPEN8_S3_ENDPOINT_URL": s3, "OPENOPEN8_BREAKER_THRESHOLD": "2",
               "OPENOPEN8_BREAKER_COOLDOWN": "60"}
        self.nodes = [start_gateway(self.addCleanup, **env), start_gateway(self.addCleanup, **env)]

    def post(self, node: int, key: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.nodes[node]}/v1/images/generations", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {key}"})

    def test_budgets_images_limits_and_circuits_are_shared_by_both_nodes(self) -> None:
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        token, key = make_token(name="shared", budget="0.064")  # exactly four images
        make_channel(kind="placeholder", models="dall-e-2")
        results: list[int] = []
        barrier = threading.Barrier(12)

        def one(i: int) -> None:
            barrier.wait()
            results.append(self.post(i % 2, key, {"model": "dall-e-2", "prompt": "a", "size": "256x256",
                                                  "response_format": "b64_json"}).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [200] * 4 + [429] * 8)
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 64000)

        # An image URL one node returned is served by the other, from the shared object store.
        _free, free_key = make_token(name="free")
        url = self.post(0, free_key, {"model": "dall-e-2", "prompt": "a", "size": "256x256"}).json()["data"][0]["url"]
        self.assertTrue(url.startswith(self.nodes[0]))
        first = requests.get(url, timeout=10)
        other = requests.get(url.replace(self.nodes[0], self.nodes[1]), timeout=10)
        self.assertEqual((first.status_code, other.status_code), (200, 200))
        self.assertEqual(other.headers["Content-Type"], "image/png")
        self.assertEqual(first.content, other.content)

        # A token limit counted on one node holds on the other.
        _limited, limited_key = make_token(name="limited", requests_per_minute=2)
        clear_of_minute_boundary()
        statuses = [self.post(i % 2, limited_key, {"model": "dall-e-2", "prompt": "a", "size": "256x256",
                                                   "response_format": "b64_json"}).status_code for i in range(4)]
        self.assertEqual(statuses, [200, 200, 429, 429])

        # A circuit opened by failures on one node keeps the other node away from that channel.
        with FakeUpstream() as broken:
            broken.respond(500, {"error": {"message": "down"}})
            make_channel(base_url=broken.url, models="dall-e-3", priority=10)
            make_channel(kind="placeholder", models="dall-e-3", priority=0)
            for _ in range(2):
                self.assertEqual(self.post(0, free_key, {"model": "dall-e-3", "prompt": "a",
                                                         "response_format": "b64_json"}).status_code, 200)
            self.assertEqual(len(broken.requests), 2)
            self.assertEqual(self.post(1, free_key, {"model": "dall-e-3", "prompt": "a",
                                                     "response_format": "b64_json"}).status_code, 200)
            self.assertEqual(len(broken.requests), 2)
        # Each node writes a completed row just after its answer has gone out, so the last one may trail the response.
        eventually(lambda: not UsageLog.objects.filter(status="pending").exists(), within=10)
