"""The production deployment the README documents: the gateway behind its nginx server block, as written there
(ports and two limits swapped for the test's). Runs where nginx is installed (make bench installs it)."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import time
import unittest
from pathlib import Path

import requests
from django.test import TransactionTestCase

from tests.factories import make_channel, make_token
from tests.processes import free_port, start, start_gateway

ROOT = Path(__file__).resolve().parents[1]


def readme_server_block() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- nginx server block -->\n```nginx\n(.*?)```\n<!-- end nginx server block -->", text, re.S)
    assert found, "the README's nginx server block"
    return found.group(1)


class BehindNginxTests(TransactionTestCase):
    def setUp(self) -> None:
        if not shutil.which("nginx"):
            raise unittest.SkipTest("nginx is not installed (make bench installs it)")

    def test_the_readmes_nginx_block_buffers_stalled_uploads_and_answers_oversized_bodies_in_json(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        _token, key = make_token(name="proxied")
        gateway = start_gateway(self.addCleanup, OPENOPEN8_WORKER_CONNECTIONS="10")
        port, work = free_port(), Path(tempfile.mkdtemp())
        block = (readme_server_block()
                 .replace("server 127.0.0.1:8000;", f"server {gateway.removeprefix('http://')};")
                 .replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
                 .replace("client_max_body_size 128m;", "client_max_body_size 1m;")
                 .replace("client_body_timeout 60s;", "client_body_timeout 3s;"))
        (work / "nginx.conf").write_text(f"""
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
{block}
}}
""")
        proxy = f"http://127.0.0.1:{port}"
        start(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work), "-g", "daemon off;"],
              url=f"{proxy}/healthz", env={}, cleanup=self.addCleanup)
        # Forty stalled uploads, four times the connections the gateway's worker has: nginx holds them, not it.
        stalled = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall((f"POST /v1/images/edits HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
                          "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
                          ).encode())
            stalled.append(sock)
            self.addCleanup(sock.close)
        started = time.monotonic()
        self.assertEqual(requests.get(f"{proxy}/healthz", timeout=3).status_code, 200)
        answer = requests.post(f"{proxy}/v1/images/generations", timeout=5, headers={"Authorization": f"Bearer {key}"},
                               json={"model": "dall-e-2", "prompt": "a", "size": "256x256",
                                     "response_format": "b64_json"})
        self.assertEqual(answer.status_code, 200, answer.text)
        self.assertLess(time.monotonic() - started, 3)
        too_big = requests.post(f"{proxy}/v1/images/generations", timeout=5, data=b"x" * (2 << 20),
                                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        self.assertEqual((too_big.status_code, too_big.json()["error"]["code"]), (413, "request_too_large"))
        # nginx gives up on the stalled bodies by its client_body_timeout.
        for sock in stalled[:3]:
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        self.assertLess(time.monotonic() - started, 3 + 10)
