# Job objects are JSON the tests read field by field.
# mypy: disable-error-code="index,operator"
"""Image jobs (Prefer: respond-async; gateway/jobs.py, job_runner.py, services.job_run) through the official openai
SDK and plain HTTP, run by a job runner in the test process or by a real `manage.py jobworker`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import openai
import requests
from django.core.files.storage import storages
from django.test import LiveServerTestCase, override_settings
from django.utils import timezone

from gateway.job_runner import runner_start, runner_stop
from gateway.models import ApiToken, IdempotentRequest, ImageJob, UsageLog
from gateway.services import jobs_sweep
from tests.base import eventually
from tests.factories import make_channel, make_price, make_token, png_b64, png_bytes
from tests.fake_upstream import FakeUpstream, Overlapping
from tests.processes import ROOT, database_url

ASYNC = {"Prefer": "respond-async"}


class JobTestCase(LiveServerTestCase):
    def setUp(self) -> None:
        make_price(model="dall-e-2", usd="0.02")
        self.token, self.key = make_token(budget="5")
        self.sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=self.key, max_retries=0)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def start_runner(self) -> None:
        with override_settings(OPENOPEN8_JOB_POLL=0.1, OPENOPEN8_JOB_CONCURRENCY=8):
            runner_start()
        self.addCleanup(runner_stop, timeout=10)

    def submit(self, key: str | None = None, **fields: Any) -> requests.Response:
        fields = {"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json", **fields}
        return requests.post(f"{self.live_server_url}/v1/images/generations", json=fields, timeout=10,
                             headers={"Authorization": f"Bearer {key or self.key}", **ASYNC})

    def poll(self, job_id: str, *, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             within: float = 20) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def done() -> bool:
            r = requests.get(f"{self.live_server_url}/v1/images/jobs/{job_id}", headers=self.auth, timeout=1)
            seen.update(r.json())
            return seen.get("status") in until

        eventually(done, within=within)
        return seen

    def spent(self) -> int:
        return ApiToken.objects.get(pk=self.token.pk).spent_micros


class JobTests(JobTestCase):
    def test_a_job_is_accepted_at_once_held_and_polled_to_its_images(self) -> None:
        self.start_runner()
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64(9, 9)}]}, delay=1.0)
            make_channel(base_url=up.url)
            raw = self.sdk.images.with_raw_response.generate(model="dall-e-2", prompt="a lighthouse",
                                                             response_format="b64_json", extra_headers=ASYNC)
            job = raw.http_response.json()
            self.assertEqual(raw.http_response.status_code, 202)
            self.assertEqual(raw.headers["Location"], f"/v1/images/jobs/{job['id']}")
            self.assertEqual(raw.headers["Cache-Control"], "no-store")
            self.assertTrue(raw.headers["Retry-After"].isdigit())
            self.assertEqual((job["object"], job["status"], job["result"], job["error"]), ("image.job", "queued",
                                                                                           None, None))
            row = UsageLog.objects.get(request_id=raw.headers["x-request-id"])
            self.assertEqual((row.status, row.reserved_micros), ("pending", 20000))  # held while it waits
            done = self.poll(job["id"])
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual(done["result"]["data"][0]["b64_json"], png_b64(9, 9))
        self.assertGreaterEqual(done["completed_at"], done["started_at"])
        eventually(lambda: UsageLog.objects.get(request_id=row.request_id).status == "success")
        self.assertEqual((UsageLog.objects.get(pk=row.pk).cost_micros, self.spent()), (20000, 20000))
        self.assertEqual(len(up.requests), 1)

    def test_a_failed_job_carries_the_error_and_is_refunded(self) -> None:
        self.start_runner()
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": "Your request was rejected by the safety system.",
                                       "type": "image_generation_user_error", "code": "moderation_blocked"}})
            make_channel(base_url=up.url)
            done = self.poll(self.submit().json()["id"])
        self.assertEqual((done["status"], done["error_status"]), ("failed", 400))
        self.assertEqual(done["error"]["code"], "content_policy_violation")
        self.assertEqual(set(done["error"]), {"message", "type", "param", "code"})
        eventually(lambda: UsageLog.objects.get().status == "error")
        self.assertEqual(self.spent(), 0)

    def test_a_client_whose_proxy_cuts_before_the_image_is_ready_still_gets_it(self) -> None:
        # Every call the client makes ends within 1 s (its proxy's limit); the provider takes 3 s.
        self.start_runner()
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64(9, 9)}]}, delay=3.0)
            make_channel(base_url=up.url)
            with self.assertRaises(requests.Timeout):
                requests.post(f"{self.live_server_url}/v1/images/generations", headers=self.auth, timeout=1,
                              json={"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json"})
            job = requests.post(f"{self.live_server_url}/v1/images/generations", timeout=1,
                                headers={**self.auth, **ASYNC},
                                json={"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json"})
            done = self.poll(job.json()["id"])
        self.assertEqual(done["result"]["data"][0]["b64_json"], png_b64(9, 9))

    def test_a_bad_request_is_refused_at_once_not_made_a_failed_job(self) -> None:
        make_channel(kind="placeholder")
        r = self.submit(n=0)
        self.assertEqual((r.status_code, r.json()["error"]["param"]), (400, "n"))
        r = self.submit(stream=True, model="gpt-image-1.5")
        self.assertEqual((r.status_code, r.json()["error"]["param"]), (400, "stream"))
        self.assertFalse(ImageJob.objects.exists())

    def test_only_the_key_that_made_a_job_sees_it_and_lists_are_newest_first(self) -> None:
        make_channel(kind="placeholder")
        ids = [self.submit().json()["id"] for _ in range(3)]
        _, other = make_token(name="bob")
        for path, method in ((f"/v1/images/jobs/{ids[0]}", "get"), (f"/v1/images/jobs/{ids[0]}/cancel", "post")):
            r = requests.request(method, f"{self.live_server_url}{path}", timeout=5,
                                 headers={"Authorization": f"Bearer {other}"})
            self.assertEqual((r.status_code, r.json()["error"]["code"]), (404, "job_not_found"))
        page = requests.get(f"{self.live_server_url}/v1/images/jobs?limit=2", headers=self.auth, timeout=5).json()
        self.assertEqual(([j["id"] for j in page["data"]], page["has_more"]), (ids[::-1][:2], True))
        rest = requests.get(f"{self.live_server_url}/v1/images/jobs?limit=2&after={page['last_id']}",
                            headers=self.auth, timeout=5).json()
        self.assertEqual(([j["id"] for j in rest["data"]], rest["has_more"]), ([ids[0]], False))
        theirs = requests.get(f"{self.live_server_url}/v1/images/jobs", timeout=5,
                              headers={"Authorization": f"Bearer {other}"}).json()
        self.assertEqual(theirs["data"], [])

    def test_a_queued_job_cancelled_is_refunded_and_never_runs(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]})
            make_channel(base_url=up.url)
            job = self.submit().json()  # no runner yet: it waits in the queue
            self.assertEqual(self.spent(), 20000)
            r = requests.post(f"{self.live_server_url}/v1/images/jobs/{job['id']}/cancel", headers=self.auth,
                              timeout=5)
            self.assertEqual(r.json()["status"], "cancelled")
            self.start_runner()
            time.sleep(0.5)
        self.assertEqual(up.requests, [])
        self.assertEqual(self.spent(), 0)
        self.assertEqual(UsageLog.objects.get().status, "error")
        self.assertEqual(self.poll(job["id"])["error"]["code"], "job_cancelled")

    def test_a_running_job_cancelled_stops_before_its_next_provider_call_and_is_refunded(self) -> None:
        self.start_runner()
        with FakeUpstream() as first, FakeUpstream() as second:
            first.respond(500, {"error": {"message": "overloaded"}}, delay=1.0)
            second.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]})
            make_channel(base_url=first.url, priority=5)
            make_channel(base_url=second.url)
            job_id = self.submit().json()["id"]
            eventually(lambda: len(first.requests) == 1)
            r = requests.post(f"{self.live_server_url}/v1/images/jobs/{job_id}/cancel", headers=self.auth, timeout=5)
            self.assertEqual(r.json()["status"], "running")  # asked to stop; the call under way goes on
            done = self.poll(job_id)
        self.assertEqual((done["status"], done["error"]["code"]), ("cancelled", "job_cancelled"))
        self.assertEqual(second.requests, [])  # the failover the job would have made
        eventually(lambda: UsageLog.objects.get().status == "error")
        self.assertEqual(self.spent(), 0)

    def test_a_key_may_have_only_so_many_jobs_waiting(self) -> None:
        ApiToken.objects.filter(pk=self.token.pk).update(max_queued_jobs=2)
        make_channel(kind="placeholder")
        answers = [self.submit() for _ in range(3)]
        self.assertEqual([a.status_code for a in answers], [202, 202, 429])
        self.assertEqual(answers[2].json()["error"]["code"], "too_many_jobs")

    def test_jobs_wait_in_the_queue_for_a_channel_at_its_limit_instead_of_failing(self) -> None:
        self.start_runner()
        slow = Overlapping({"created": 1, "data": [{"b64_json": png_b64()}]}, 0.4)

        with FakeUpstream() as up:
            up.respond(200, slow)
            make_channel(base_url=up.url, max_in_flight=1)
            ids = [self.submit().json()["id"] for _ in range(4)]
            states = [self.poll(job_id, within=30)["status"] for job_id in ids]
        self.assertEqual(states, ["succeeded"] * 4)
        self.assertEqual((len(up.requests), slow.most), (4, 1))
        self.assertEqual(self.spent(), 4 * 20000)

    def test_an_edit_job_keeps_its_input_until_it_ends(self) -> None:
        make_price(model="gpt-image-1.5", usd="0.04")
        kept = storages["jobs"]
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]})
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = requests.post(f"{self.live_server_url}/v1/images/edits", headers={**self.auth, **ASYNC}, timeout=10,
                              data={"model": "gpt-image-1.5", "prompt": "add a door"},
                              files={"image[]": ("house.png", png_bytes(32, 32), "image/png")})
            job_id = r.json()["id"]
            self.assertEqual(len(kept.listdir(job_id)[1]), 1)  # queued: its image is kept for the run
            self.start_runner()
            done = self.poll(job_id)
        self.assertEqual(done["status"], "succeeded")
        fields, files = up.requests[0].form()
        self.assertEqual((fields["prompt"], files[0].data), ("add a door", png_bytes(32, 32)))
        self.assertEqual(kept.listdir(job_id)[1], [])  # ended: deleted

    def test_a_submission_repeated_with_its_idempotency_key_is_the_same_job(self) -> None:
        make_channel(kind="placeholder")
        first = requests.post(f"{self.live_server_url}/v1/images/generations", timeout=10,
                              headers={**self.auth, **ASYNC, "Idempotency-Key": "job-1"},
                              json={"model": "dall-e-2", "prompt": "a lighthouse"})
        again = requests.post(f"{self.live_server_url}/v1/images/generations", timeout=10,
                              headers={**self.auth, **ASYNC, "Idempotency-Key": "job-1"},
                              json={"model": "dall-e-2", "prompt": "a lighthouse"})
        self.assertEqual((first.status_code, again.status_code), (202, 202))
        self.assertEqual(again.json()["id"], first.json()["id"])
        self.assertEqual(ImageJob.objects.count(), 1)
        self.assertEqual(IdempotentRequest.objects.get().status_code, 202)
        self.assertEqual(self.spent(), 20000)


class JobRecoveryTests(JobTestCase):
    def test_a_job_whose_runner_died_before_any_provider_call_runs_again_and_is_charged_once(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]})
            make_channel(base_url=up.url)
            job_id = self.submit().json()["id"]
            # What a runner killed between taking the job and calling a provider leaves behind.
            ImageJob.objects.filter(pk=job_id).update(status="running", runs=1,
                                                      heartbeat_at=timezone.now() - timedelta(minutes=5))
            self.assertEqual(jobs_sweep(), 1)
            self.start_runner()
            done = self.poll(job_id)
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual(ImageJob.objects.get(pk=job_id).runs, 2)
        eventually(lambda: UsageLog.objects.get().status == "success")
        self.assertEqual((len(up.requests), self.spent()), (1, 20000))

    def test_a_job_lost_after_calling_a_channel_safe_to_retry_runs_again(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]})
            channel = make_channel(base_url=up.url, safe_to_retry=True)
            job_id = self.submit().json()["id"]
            ImageJob.objects.filter(pk=job_id).update(status="running", runs=1, called_channel=channel,
                                                      provider_called_at=timezone.now(),
                                                      heartbeat_at=timezone.now() - timedelta(minutes=5))
            self.assertEqual(jobs_sweep(), 1)
            self.start_runner()
            self.assertEqual(self.poll(job_id)["status"], "succeeded")

    @override_settings(OPENOPEN8_JOB_LEASE=1.0, OPENOPEN8_REQUEST_DEADLINE=2.0)
    def test_a_job_worker_killed_while_the_provider_works_is_failed_and_refunded_once(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"created": 1, "data": [{"b64_json": png_b64()}]}, delay=30)
            make_channel(base_url=up.url)
            job_id = self.submit().json()["id"]
            worker = subprocess.Popen(
                [sys.executable, "manage.py", "jobworker", "--concurrency", "2"], cwd=ROOT,
                env={**os.environ, "DATABASE_URL": database_url(), "OPENOPEN8_JOB_POLL": "0.1",
                     "OPENOPEN8_JOB_LEASE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(worker.wait, 10)
            self.addCleanup(worker.kill)
            eventually(lambda: len(up.requests) == 1, within=20)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            eventually(lambda: ImageJob.objects.get(pk=job_id).heartbeat_at < timezone.now() - timedelta(seconds=1))
            time.sleep(2)  # the run's deadline passes: whatever the provider makes can no longer be had
            self.assertEqual(jobs_sweep(), 1)
            self.assertEqual(jobs_sweep(), 0)  # swept once
        job = ImageJob.objects.get(pk=job_id)
        self.assertEqual((job.status, job.error["code"]), ("failed", "upstream_timeout"))
        self.assertEqual(UsageLog.objects.get().status, "error")
        self.assertEqual(self.spent(), 0)
