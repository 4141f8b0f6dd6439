"""Shared test-case helpers: posting to the API and checking OpenAI-shaped errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from django.core.servers.basehttp import ThreadedWSGIServer
from django.test import LiveServerTestCase, TestCase
from django.test.client import Client
from django.test.testcases import LiveServerThread

from tests.factories import make_token


def assert_openai_error(r: Any, status: int, type: str, code: str | None = None,
                        param: str | None = None) -> dict[str, Any]:
    """The response is OpenAI's error body with this status, type, code and param; return the error object."""
    assert r.status_code == status, (r.status_code, r.content[:500])
    assert r["Content-Type"].startswith("application/json"), r["Content-Type"]
    body = json.loads(r.content)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    assert error["type"] == type, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"], error
    return error


def clear_of_minute_boundary(needed: float = 10.0) -> None:
    """Per-minute limits count in fixed windows of the clock's minutes (gateway/state/); a test that fills one must
    not straddle two. Waits for the next minute when fewer than ``needed`` seconds of this one are left."""
    left = 60 - time.time() % 60
    if left < needed:
        time.sleep(left + 0.05)


def eventually(check: Callable[[], bool], *, within: float = 5.0) -> None:
    """Wait for something that happens asynchronously (a message between processes, say) to become true."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within:g} s")
        time.sleep(0.01)


def post_json(client: Client, path: str, body: Any, key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=headers)


class ApiTestCase(TestCase):
    """A token ``self.key`` (unlimited budget) and ``self.generate(body)`` posting to /v1/images/generations."""

    def setUp(self) -> None:
        self.token, self.key = make_token()

    def generate(self, body: Any, key: str | None = "default") -> Any:
        return post_json(self.client, "/v1/images/generations", body, self.key if key == "default" else key)


class _BacklogServer(ThreadedWSGIServer):
    request_queue_size = 128  # Django's 10 resets connections when dozens of clients connect at once


class _BacklogThread(LiveServerThread):
    server_class = _BacklogServer


class ConcurrentLiveServerTestCase(LiveServerTestCase):
    """A live server that takes dozens of simultaneous connections, for concurrency tests."""

    server_thread_class = _BacklogThread


def post_at_once(url: str, body: Any, keys: list[str],
                 headers: dict[str, str] | None = None) -> list[requests.Response]:
    """POST ``body`` (with ``headers``) to ``url`` once for each key, every request released at the same moment; the
    answers in the order they came."""
    answers: list[requests.Response] = []
    lock, barrier = threading.Lock(), threading.Barrier(len(keys))

    def one(key: str) -> None:
        barrier.wait()
        answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                               timeout=60)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers
