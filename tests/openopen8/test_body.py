"""The body deadline (openopen8/body.py) and the per-key cap on bodies arriving, against a real gunicorn worker:
slow uploads from one key are refused or cut off, and other keys and /healthz go on answering."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import requests
from django.test import TransactionTestCase

from tests.factories import make_channel, make_token
from tests.processes import start_gateway


def drip_upload(address: tuple[str, int], key: str) -> socket.socket:
    """A multipart edit whose headers arrive whole and whose 100 kB body has barely started."""
    sock = socket.create_connection(address, timeout=10)
    sock.sendall((f"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                  "--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na").encode())
    return sock


def answer(sock: socket.socket, within: float) -> tuple[int, dict[str, object]] | None:
    """The status and JSON body the gateway sent, or None if it sent nothing within ``within`` seconds."""
    sock.settimeout(within)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                data.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, IndexError):
        if not data:
            return None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


class SlowUploadTests(TransactionTestCase):
    def test_on_gevent_one_keys_slow_uploads_are_capped_and_cut_off_while_others_and_healthz_answer(self) -> None:
        # Two pooled database connections for three bodies held: a body arriving must not hold one.
        self.check_slow_uploads(OPENOPEN8_WORKER_CONNECTIONS="10", OPENOPEN8_DB_POOL_SIZE="2")

    def test_on_threads_one_keys_slow_uploads_are_capped_and_cut_off_while_others_and_healthz_answer(self) -> None:
        self.check_slow_uploads(OPENOPEN8_WORKER_CLASS="gthread", OPENOPEN8_THREADS="10")

    def check_slow_uploads(self, **worker: str) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        _slow, slow_key = make_token(name="slow")
        _other, other_key = make_token(name="other")
        # Ten connections (or threads) in the one worker: twelve dripping uploads would take them all without the cap.
        gateway = start_gateway(self.addCleanup, OPENOPEN8_BODY_TIMEOUT="5", OPENOPEN8_MAX_UPLOADS_PER_KEY="3",
                                **worker)
        parts = urlsplit(gateway)
        address = (parts.hostname or "127.0.0.1", parts.port or 80)
        started = time.monotonic()
        drips = [drip_upload(address, slow_key) for _ in range(12)]
        stop = threading.Event()

        def keep_dripping() -> None:  # a byte a second: each read gets something, the whole body never comes
            while not stop.wait(1):
                for sock in drips:
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass

        threading.Thread(target=keep_dripping, daemon=True).start()
        self.addCleanup(stop.set)
        time.sleep(1.5)
        early = [answer(sock, within=2) if select.select([sock], [], [], 0)[0] else None for sock in drips]
        refused = [a for a in early if a is not None]
        self.assertEqual(len(refused), 9, early)  # all but three refused at once, before their bodies were read
        self.assertTrue(all(status == 429 and "bodies arriving" in str(body) for status, body in refused))
        # Meanwhile the worker answers everyone else.
        self.assertEqual(requests.get(f"{gateway}/healthz", timeout=3).status_code, 200)
        other = requests.post(f"{gateway}/v1/images/generations", timeout=5,
                              headers={"Authorization": f"Bearer {other_key}"},
                              json={"model": "dall-e-2", "prompt": "a", "size": "256x256",
                                    "response_format": "b64_json"})
        self.assertEqual(other.status_code, 200)
        # The three it took are cut off at the deadline, dripping or not, with OpenAI's JSON and the connection closed.
        held = [sock for sock, a in zip(drips, early, strict=True) if a is None]
        for sock in held:
            status, body = answer(sock, within=10) or (0, {})
            self.assertEqual(status, 408, body)
            self.assertEqual(body["error"]["code"], "request_timeout")  # type: ignore[index]
        self.assertLess(time.monotonic() - started, 5 + 8)
        for sock in drips:
            sock.close()

    def test_a_keys_in_flight_limit_is_taken_before_its_body_is_read(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        _token, key = make_token(name="limited", max_in_flight=2)
        gateway = start_gateway(self.addCleanup, OPENOPEN8_BODY_TIMEOUT="30")
        parts = urlsplit(gateway)
        drips = [drip_upload((parts.hostname or "127.0.0.1", parts.port or 80), key) for _ in range(3)]
        for sock in drips:
            self.addCleanup(sock.close)
        time.sleep(1)
        early = [answer(sock, within=2) if select.select([sock], [], [], 0)[0] else None for sock in drips]
        refused = [a for a in early if a is not None]
        self.assertEqual([status for status, _ in refused], [429])  # the third, its body never read
        self.assertIn("2 request(s) running", str(refused[0][1]))
