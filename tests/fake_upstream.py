"""A real HTTP server on 127.0.0.1 that plays an image provider: scripted answers, recorded requests.

    with FakeUpstream() as up:
        up.respond(500, {"error": {"message": "boom"}})
        ...
        assert up.requests[0].headers["Authorization"] == "Bearer k1"
"""

from __future__ import annotations

import base64
import email.policy
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclass
class EventStream:
    """A streamed answer: server-sent events as OpenAI sends them (``event:`` and ``data:`` lines), each after its
    delay in seconds; ``cut`` drops the connection after that many events. ``sent_at`` records when each went out
    (time.monotonic)."""

    events: list[tuple[float, dict[str, Any]]]
    cut: int | None = None
    chunked: bool = False  # Transfer-Encoding: chunked, as OpenAI's servers send it; else the connection's end
    sent_at: list[float] = field(default_factory=list)

    def frames(self) -> Any:
        for index, (delay, event) in enumerate(self.events):
            if self.cut is not None and index == self.cut:
                return
            time.sleep(delay)
            yield index, f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()


class Overlapping:
    """An answer given after ``seconds``, counting how many requests the provider held at once (``most``)."""

    def __init__(self, answer: Any, seconds: float) -> None:
        self.answer, self.seconds = answer, seconds
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, _request: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return self.answer


Body = bytes | str | dict[str, Any] | list[Any] | EventStream


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int = 0  # tells one client connection from another

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> tuple[dict[str, str], list[Part]]:
        """A multipart body's text fields, and its files in order."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        fields, files = {}, []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            filename = part.get_filename()
            if filename is None:
                fields[str(name)] = payload.decode()
            else:
                files.append(Part(str(name), filename, part.get_content_type(), payload))
        return fields, files


@dataclass
class Part:
    name: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Scripted:
    status: int
    body: Body | Callable[[Recorded], Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # "reset": drop the connection without answering; "cut": send the headers and half the body, then reset.
    fault: str | None = None


class _CaseInsensitive(dict[str, str]):
    def __getitem__(self, key: str) -> str:
        return next(v for k, v in self.items() if k.lower() == key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return next((v for k, v in self.items() if k.lower() == key.lower()), default)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections that many clients open at once


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self._queue: list[Scripted] = []
        self._default = Scripted(500, {"error": {"message": "nothing scripted"}})
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def respond(self, status: int, body: Body | Callable[[Recorded], Any], *, headers: dict[str, str] | None = None,
                delay: float = 0.0, fault: str | None = None) -> None:
        """Answer every request from now on like this (after any queued answers). A callable body gets the
        request and returns the body, or a (status, body) pair."""
        self._default = Scripted(status, body, headers or {}, delay, fault)

    def queue(self, status: int, body: Body | Callable[[Recorded], Any], *, headers: dict[str, str] | None = None,
              delay: float = 0.0, fault: str | None = None) -> None:
        """Answer the next request like this, once."""
        self._queue.append(Scripted(status, body, headers or {}, delay, fault))

    def serve_file(self, path: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve ``data`` on GET ``path`` (as a provider's image URL); return the full URL."""
        self.files[path] = (data, content_type)
        return self.url + path

    def __enter__(self) -> FakeUpstream:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next(self) -> Scripted:
        with self._lock:
            return self._queue.pop(0) if self._queue else self._default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> Recorded:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path, _CaseInsensitive(self.headers.items()), body,
                               self.client_address[1])
                with fake._lock:
                    fake.requests.append(rec)
                return rec

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                if self.path in fake.files:
                    self._record()
                    data, content_type = fake.files[self.path]
                    self._send(200, data, {"Content-Type": content_type})
                else:
                    self.do_POST()

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _stream(self, stream: EventStream) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if stream.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")  # the body ends when the connection does
                    self.close_connection = True
                self.end_headers()
                try:
                    for _index, data in stream.frames():
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if stream.chunked else data)
                        self.wfile.flush()
                        stream.sent_at.append(time.monotonic())
                    if stream.cut is not None:
                        self._reset()
                    elif stream.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the gateway went away
                    pass

            def do_POST(self) -> None:
                rec = self._record()
                script = fake._next()
                if script.delay:
                    time.sleep(script.delay)
                status, body = script.status, script.body(rec) if callable(script.body) else script.body
                if isinstance(body, tuple):
                    status, body = body
                headers = {"Content-Type": "application/json", **script.headers}
                if isinstance(body, EventStream):
                    self._stream(body)
                    return
                if isinstance(body, (dict, list)):
                    body = json.dumps(body)
                if isinstance(body, str):
                    body = body.encode()
                try:
                    if script.fault == "reset":
                        self._reset()
                    elif script.fault == "cut":
                        self.send_response(status)
                        for name, value in headers.items():
                            self.send_header(name, value)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self._reset()
                    else:
                        self._send(status, body, headers)
                except OSError:  # the client went away, or the fault closed the socket
                    pass

        return Handler


def a1111_answer(request: Recorded, *, grid: bool = False) -> dict[str, object]:
    """What the web UI answers for txt2img: batch_size images, a grid first when asked, info as a JSON string."""
    asked = request.json()["batch_size"] * request.json()["n_iter"]
    images = [_png_b64(4 + i, 4) for i in range(asked)]
    first = 0
    if grid:
        images.insert(0, _png_b64(99, 99))
        first = 1
    return {"images": images, "parameters": request.json(), "info": json.dumps({"index_of_first_image": first})}


def _png_b64(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def echo_credentials(status: int) -> Callable[[Recorded], Any]:
    """A hostile provider's error answer: every credential the request carried (each authenticating header as sent,
    the token after its scheme, and a Basic header's pair decoded), put back in every field an error has."""

    def answer(rec: Recorded) -> tuple[int, dict[str, Any]]:
        sent = [v for k, v in rec.headers.items() if k.lower() in ("authorization", "api-key", "x-goog-api-key")]
        tokens = [v.partition(" ")[2] or v for v in sent]
        tokens += [base64.b64decode(t).decode() for v, t in zip(sent, tokens, strict=True) if v.startswith("Basic ")]
        echoed = " | ".join(sent + tokens)
        return status, {"error": {"message": f"You sent {echoed}", "param": tokens[0] if tokens else "",
                                  "code": tokens[-1] if tokens else "", "type": echoed, "status": echoed},
                        "detail": f"Not authorised: {echoed}", "message": echoed}

    return answer
