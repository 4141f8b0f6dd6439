"""The outbound HTTP seam (openopen8/core/http.py, http_pool.py) against real sockets."""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time

from django.conf import settings
from django.test import override_settings

from openopen8.core import http, http_pool
from openopen8.core.errors import UpstreamError
from tests.base import ApiTestCase, eventually
from tests.factories import openai_images
from tests.fake_upstream import FakeUpstream


class ProviderConnectionTests(ApiTestCase):
    def test_calls_from_different_threads_reuse_one_warm_provider_connection(self) -> None:
        # Request threads take turns; with a connection per thread, each turn to a real provider could cost a new
        # TCP and TLS handshake. The process's pool hands the warm connection to whichever thread calls next.
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            request = http.UpstreamRequest("POST", f"{up.url}/v1/images/generations", json={"prompt": "a"})
            for _ in range(3):
                thread = threading.Thread(target=http.send, args=(request,), kwargs={"timeout": 5})
                thread.start()
                thread.join()
        self.assertEqual(len(up.requests), 3)
        self.assertEqual(len({r.client_port for r in up.requests}), 1, [r.client_port for r in up.requests])

    @override_settings(OPENOPEN8_MAX_UPSTREAM_BYTES=2000)
    def test_a_connection_left_with_part_of_an_answer_is_not_used_again(self) -> None:
        # An answer over the cap is abandoned half read; the rest of it must not be taken for the next answer.
        with FakeUpstream() as up:
            request = http.UpstreamRequest("POST", f"{up.url}/v1/images/generations", json={"prompt": "a"})
            up.queue(200, {"data": [{"b64_json": "A" * 500_000}]})
            up.queue(200, {"created": 2, "data": []})
            with self.assertRaisesMessage(UpstreamError, "2000-byte cap"):
                http.send(request, timeout=5)
            answer = http.send(request, timeout=5)
        self.assertEqual((answer.status, answer.json()), (200, {"created": 2, "data": []}))
        self.assertEqual(len({r.client_port for r in up.requests}), 2)

    def test_credentials_in_a_provider_url_are_sent_as_basic_auth(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            url = up.url.replace("http://", "http://webui:p%40ss@") + "/sdapi/v1/txt2img?x=1"
            http.send(http.UpstreamRequest("POST", url, json={"prompt": "a"}), timeout=5)
        self.assertEqual(up.requests[0].headers["Authorization"], "Basic " + base64.b64encode(b"webui:p@ss").decode())
        self.assertEqual(up.requests[0].path, "/sdapi/v1/txt2img?x=1")

    def test_pools_are_kept_for_at_most_max_origins_providers(self) -> None:
        # A gateway with many channels keeps a bounded number of provider pools; the oldest is closed to make room.
        http_pool.pools_reset()
        first = http_pool.provider_pool("http://127.0.0.1:1")
        for port in range(2, http_pool.MAX_ORIGINS + 2):
            http_pool.provider_pool(f"http://127.0.0.1:{port}")
        self.assertEqual(len(http_pool.pool_origins()), http_pool.MAX_ORIGINS)
        self.assertNotIn("http://127.0.0.1:1", http_pool.pool_origins())
        self.assertIsNone(first.pool)  # closed: its idle connections are gone

    def test_a_connection_the_provider_closed_while_idle_is_not_used_again(self) -> None:
        # A provider closes keep-alive connections it finds idle; the next call must take a new one, not send its
        # request into the closed one (where it would fail, or be taken for a fault of the provider's).
        answer = json.dumps(openai_images(1)).encode()
        served: list[int] = []
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(10)

            def provider() -> None:
                for _ in range(2):
                    peer, address = server.accept()
                    with peer:
                        peer.recv(65536)
                        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
                        served.append(address[1])
                        # Closed once answered, without saying so: the connection stays in the gateway's pool.

            thread = threading.Thread(target=provider, daemon=True)
            thread.start()
            request = http.UpstreamRequest("POST", f"http://127.0.0.1:{server.getsockname()[1]}/v1/images/generations",
                                           json={"prompt": "a"})
            first = http.send(request, timeout=5)
            eventually(lambda: len(served) == 1)
            time.sleep(0.05)  # the close reaches the gateway's side of the connection
            second = http.send(request, timeout=5)
            thread.join(5)
        self.assertEqual([first.status, second.status], [200, 200])
        self.assertEqual(len(set(served)), 2)  # two connections: the closed one was not reused

    def test_checking_a_pooled_connection_gives_no_other_request_of_a_gevent_worker_a_turn(self) -> None:
        # Under gevent (the production worker) urllib3's own check, a poll that should not wait, still let every
        # other request of the worker run first, at the start of each provider call (bench/RESULTS.md). The provider
        # pool's connections check without yielding. Run in a process of its own,
        # patched by gevent as a worker is.
        script = """if True:
            import json, socket
            from gevent import monkey
            monkey.patch_all()
            import django, gevent
            django.setup()
            from urllib3.connection import HTTPConnection
            from openopen8.core import http_pool
            server = socket.create_server(("127.0.0.1", 0))
            conn = http_pool.provider_pool(f"http://127.0.0.1:{server.getsockname()[1]}")._new_conn()
            conn.connect()
            peer, _ = server.accept()
            seen = {}
            checks = (("urllib3", HTTPConnection.is_connected.fget), ("provider pool", type(conn).is_connected.fget))
            for name, check in checks:
                ran = []
                gevent.spawn(ran.append, "another request")
                seen[name] = {"open": check(conn), "others ran meanwhile": bool(ran)}
                gevent.sleep(0)
            peer.close()
            gevent.sleep(0.05)
            seen["after the provider closed it"] = type(conn).is_connected.fget(conn)
            print(json.dumps(seen))
        """
        out = subprocess.run([sys.executable, "-c", script], cwd=settings.BASE_DIR, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "openopen8.settings"})
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        self.assertEqual(json.loads(out.stdout), {
            "urllib3": {"open": True, "others ran meanwhile": True},  # what the check replaces
            "provider pool": {"open": True, "others ran meanwhile": False},
            "after the provider closed it": False,
        })

    def test_a_threaded_worker_never_loads_gevent(self) -> None:
        # gevent is dead weight in a gthread worker: only OPENOPEN8_WORKER_CLASS=gevent brings it in, for the check a
        # pooled provider connection gets before it is used again.
        script = """if True:
            import sys, threading
            from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
            import django
            django.setup()
            from openopen8.core import http

            class Answer(BaseHTTPRequestHandler):
                protocol_version = "HTTP/1.1"
                def do_GET(self):
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                def log_message(self, *args):
                    pass

            server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"http://127.0.0.1:{server.server_address[1]}/v1/models"
            statuses = [http.send(http.UpstreamRequest("GET", url), timeout=5).status for _ in range(2)]
            print(statuses, "gevent" in sys.modules)
        """
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "openopen8.settings"}
        for worker_class, loaded in (("gthread", False), ("gevent", True)):
            out = subprocess.run([sys.executable, "-c", script], cwd=settings.BASE_DIR, capture_output=True,
                                 text=True, timeout=60, env={**env, "OPENOPEN8_WORKER_CLASS": worker_class})
            self.assertEqual(out.stdout.strip(), f"[200, 200] {loaded}", out.stderr[-2000:])


def serve_pieces(pieces: list[bytes]) -> tuple[str, threading.Thread]:
    """A one-request server answering ``text/event-stream`` in these pieces, a pause between them, then closing."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                         .split(b":")[1])
            while len(body) < length:  # all of it: closing with bytes unread would reset the connection
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            with contextlib.suppress(OSError):  # a client that refused the answer has hung up
                for piece in pieces:
                    conn.sendall(piece)
                    time.sleep(0.05)
                conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1/images/generations", thread


class EventReaderTests(ApiTestCase):
    def events(self, pieces: list[bytes]) -> list[bytes]:
        url, thread = serve_pieces(pieces)
        seen: list[bytes] = []
        http.send_events(http.UpstreamRequest("POST", url, json={"stream": True}), timeout=5, on_event=seen.append)
        thread.join(5)
        return seen

    def test_events_are_read_as_server_sent_events_are_framed_wherever_the_pieces_break(self) -> None:
        seen = self.events([b": keep-alive\r\n\r\nevent: a\r\ndata: {\"x\":", b"1}\r\n", b"\r\n",
                            b"data:line1\ndata:  line2\n\nid: 7\n\n", b"data: last"])
        # A comment or an event without data is nothing; one space after "data:" is not the data's.
        self.assertEqual(seen, [b'{"x":1}', b"line1\n line2", b"last"])

    def test_a_multi_megabyte_event_arrives_whole(self) -> None:
        line = b"data: " + b"A" * 3_000_000 + b"\n\n"
        seen = self.events([line[i:i + 100_000] for i in range(0, len(line), 100_000)])
        self.assertEqual([len(event) for event in seen], [3_000_000])

    @override_settings(OPENOPEN8_MAX_UPSTREAM_BYTES=2000)
    def test_an_event_larger_than_the_cap_is_refused_before_it_ends(self) -> None:
        with self.assertRaisesMessage(UpstreamError, "larger than the 2000-byte cap"):
            self.events([b"data: " + b"A" * 1500, b"B" * 1500, b"\n\n"])


class ImageUrlGuardTests(ApiTestCase):
    """The guard on image URLs (a client's image_url, a provider's result on another host)."""

    def fetch_error(self, url: str) -> str:
        with self.assertRaises(UpstreamError) as caught:
            http.fetch(url, timeout=2, max_bytes=1000, into=io.BytesIO())
        return caught.exception.message

    def test_an_open_and_a_closed_private_port_get_the_same_answer_and_neither_is_connected_to(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        self.addCleanup(listener.close)
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        open_answer = self.fetch_error(f"http://127.0.0.1:{listener.getsockname()[1]}/a.png")
        closed_answer = self.fetch_error(f"http://127.0.0.1:{closed_port}/a.png")
        name_answer = self.fetch_error(f"http://localhost:{closed_port}/a.png")
        self.assertEqual({open_answer, closed_answer, name_answer}, {open_answer})
        self.assertIn("private or local address", open_answer)
        self.assertNotIn("127.0.0.1", open_answer)
        with self.assertRaises(BlockingIOError):
            listener.accept()  # refused before connecting: nobody knocked

    def test_private_addresses_inside_ipv6_forms_are_refused(self) -> None:
        for host in ("[::ffff:127.0.0.1]", "[64:ff9b::7f00:1]", "[64:ff9b::a00:1]", "[2002:7f00:1::1]",
                     "[::7f00:1]", "[::1]", "[fd00::1]", "169.254.169.254", "0.0.0.0", "10.1.2.3"):
            with self.subTest(host):
                self.assertIn("private or local address", self.fetch_error(f"http://{host}:8080/a.png"))

    def test_a_public_address_in_those_forms_is_not_refused_by_the_guard(self) -> None:
        for text in ("64:ff9b::808:808", "2002:808:808::1", "8.8.8.8"):
            self.assertFalse(http_pool.blocked(ipaddress.ip_address(text)))
