"""Streamed image answers (``stream: true``): OpenAI's server-sent events, relayed from a provider that streams as
they arrive, or made from a provider's images when they are ready, with an SSE comment while nothing is ready.

The channels are tried by ``images_route`` in a thread of the request's own; events reach the client's response
through a small queue, so a slow client slows the provider's read and a stream holds about one event in memory.
Until the first event a failed channel fails over as for any request; after it, a failure ends the stream with an
``error`` event. The usage row is completed once both sides have ended (the client's answer, and the channels'),
charging the images the provider made, as any request's is.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

from channels import adapters
from channels.adapters import ChannelTarget, get_adapter, usage_summed
from gateway.cache import ConfigSnapshot
from gateway.hosting import images_deliver
from gateway.idempotency import Claim, idempotency_give_back, idempotency_keep
from gateway.metrics import record_first_event, record_request
from gateway.models import Price, UsageLog
from gateway.routing import images_route
from gateway.usage import Attempt, usage_close, usage_delivered, usage_departed, usage_fail
from gateway.usage_writers import usage_complete
from openopen8.core.errors import GatewayError, database_unavailable
from openopen8.core.schemas import ImageData, ImageRequest, ImagesResponse, JSONDict

logger = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
QUEUE_EVENTS = 4  # events waiting for the client at most: a multi-megabyte event each, at worst


class StreamBroken(GatewayError):
    """The stream failed after the client had events from it: no other channel may start the images over."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class _Cancelled(Exception):
    """The client went away: stop reading the provider."""


def frame(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def without_stream(req: ImageRequest) -> ImageRequest:
    """The request as a provider that does not stream is sent it."""
    fields = {k: v for k, v in req.fields.items() if k not in ("stream", "partial_images")}
    return replace(req, fields=fields, stream=False)


def completed_event(req: ImageRequest, image: ImageData, usage: Any) -> JSONDict:
    """A completed event for an image a provider made whole, with OpenAI's fields."""
    fields = req.fields
    prefix = "image_generation" if req.endpoint == "generations" else "image_edit"
    return {"type": f"{prefix}.completed", "b64_json": image.b64_json, "created_at": int(time.time()),
            "size": req.size or "auto", "quality": req.quality or "auto",
            "background": fields.get("background", "auto"), "output_format": fields.get("output_format", "png"),
            "usage": usage if isinstance(usage, dict) else {
                "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}}


def stream_replayed(req: ImageRequest, answer: JSONDict) -> Iterator[bytes]:
    """A stream's answer given again to a repeat of its Idempotency-Key: a completed event for each image."""
    for item in answer.get("data", []):
        event = completed_event(req, ImageData(b64_json=item.get("b64_json")), answer.get("usage"))
        yield frame(event["type"], json.dumps(event, separators=(",", ":")).encode())


class StreamAnswer:
    """One streamed request from the moment its pending row is written: ``start`` tries the channels, ``first_error``
    says whether it failed before anything could be streamed, iterating it gives the answer's bytes."""

    def __init__(self, *, req: ImageRequest, targets: list[ChannelTarget], config: ConfigSnapshot, log: UsageLog,
                 row: Price | None, multiplier: Decimal, files_url: str, end_user_id: str, started: float,
                 attempts: list[Attempt], stack: ExitStack, claim: Claim | None = None) -> None:
        self.req, self.targets, self.config, self.log, self.row = req, targets, config, log, row
        self.claim = claim
        self.multiplier, self.files_url, self.end_user_id, self.started = multiplier, files_url, end_user_id, started
        self.attempts, self.stack = attempts, stack
        self.prefix = "image_generation" if req.endpoint == "generations" else "image_edit"
        self.queue: queue.Queue[tuple[str, Any, bytes]] = queue.Queue(maxsize=QUEUE_EVENTS)
        self.cancelled = threading.Event()
        self.relayed = 0  # provider events put through to the client
        self.completed: list[ImageData] = []  # images of completed events relayed, and their usage
        self.completed_usage: list[JSONDict] = []
        self.result: ImagesResponse | None = None
        self.error: GatewayError | None = None
        self.sent_any = False
        self.delivered = 0
        self._head: tuple[str, Any, bytes] | None = None
        self._lock = threading.Lock()
        self._sides = {"client": False, "channels": False}
        self._gone = False
        self._finished = False  # the client's answer was written to its end

    # The channels' side, in a thread of its own.

    def start(self) -> None:
        threading.Thread(target=self._route, name=f"stream {self.log.request_id}", daemon=True).start()

    def _route(self) -> None:
        try:
            self.result = images_route(
                replace(self.req, response_format="b64_json"), self.targets,
                circuits=self.config.circuits_for([t.id for t in self.targets]), attempts=self.attempts,
                files_url=self.files_url, deadline=self.started + settings.OPENOPEN8_REQUEST_DEADLINE,
                end_user_id=self.end_user_id, call=self._call)
            self._put(("done", self.result, b""))
        except GatewayError as error:
            self._failed(error)
        except (OperationalError, InterfaceError):
            self._failed(database_unavailable())
        except Exception:
            logger.exception("stream of request %s failed", self.log.request_id)
            self._failed(GatewayError("Internal error."))
        finally:
            self._ended("channels")
            connections.close_all()

    def _failed(self, error: GatewayError) -> None:
        self.error = error
        self._put(("error", error, b""))

    def _call(self, target: ChannelTarget, req: ImageRequest, *, timeout: float) -> tuple[ImagesResponse, int]:
        if not get_adapter(target.kind).streams:
            return adapters.call(target, without_stream(req), timeout=timeout)

        def emit(event: JSONDict, raw: bytes) -> None:
            completed = str(event.get("type", "")).endswith(".completed")
            if completed:
                self.completed.append(ImageData(b64_json=event["b64_json"]))
                if isinstance(event.get("usage"), dict):
                    self.completed_usage.append(event["usage"])
            if not (completed and self.req.response_format == "url"):  # the raw event is relayed: not its image twice
                event = {k: v for k, v in event.items() if k != "b64_json"}
            self.relayed += 1
            self._put(("event", event, raw))

        try:
            return adapters.call_streaming(target, req, timeout=timeout, emit=emit)
        except _Cancelled:
            raise StreamBroken("The client went away during the stream.") from None
        except GatewayError as error:
            if self.relayed:
                raise StreamBroken(f"The provider's stream broke off: {error.message}") from error
            raise

    def _put(self, item: tuple[str, Any, bytes]) -> None:
        """Hand an item to the client's side, waiting while the queue is full; an event raises ``_Cancelled`` once
        the client has gone, and anything else is dropped then (nobody reads it)."""
        while True:
            if self.cancelled.is_set():
                if item[0] == "event":
                    raise _Cancelled
                return
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # The client's side.

    def first_error(self, wait: float) -> GatewayError | None:
        """Wait up to ``wait`` seconds for the first thing to tell the client: an error then is returned (and the
        client's side ends: it is answered as plain JSON with its status); anything else streams."""
        try:
            item = self.queue.get(timeout=wait)
        except queue.Empty:
            return None
        if item[0] == "error":
            self._ended("client")
            error: GatewayError = item[1]
            return error
        self._head = item
        return None

    def __iter__(self) -> Iterator[bytes]:
        return self._frames()

    def _frames(self) -> Iterator[bytes]:
        keepalive = settings.OPENOPEN8_STREAM_KEEPALIVE
        try:
            done = False
            while not done:
                if self._head is not None:
                    item, self._head = self._head, None
                else:
                    try:
                        item = self.queue.get(timeout=keepalive)
                    except queue.Empty:
                        yield KEEPALIVE
                        continue
                kind, value, raw = item
                if kind == "event":
                    yield from self._event(value, raw)
                elif kind == "done":
                    done = True
                    if not self.relayed:  # a provider that does not stream: its images become completed events
                        for image in value.data:
                            yield from self._event(self._completed(image, value.extra.get("usage")), b"")
                else:
                    done = True
                    yield frame("error", json.dumps({"type": "error", **value.to_body()}).encode())
            self._finished = True
        finally:
            self.close()

    def _event(self, event: JSONDict, raw: bytes) -> Iterator[bytes]:
        """An event's frame; a large one in pieces, so its data is not copied into it."""
        if not self.sent_any:
            self.sent_any = True
            record_first_event(self.req.endpoint, time.monotonic() - self.started)
        kind = str(event.get("type", ""))
        if kind.endswith(".completed"):
            self.delivered += 1
            if self.req.response_format == "url":  # the hosted image too, as the client asked
                hosted = images_deliver(ImagesResponse(0, [ImageData(b64_json=event["b64_json"])]),
                                        response_format="url", files_url=self.files_url,
                                        ttl=settings.OPENOPEN8_IMAGE_TTL, timeout=10)
                event, raw = {**event, "url": hosted.data[0].url}, b""
        data = raw or json.dumps(event, separators=(",", ":")).encode()
        if len(data) < 65536:
            yield frame(kind, data)
        else:
            yield from (b"event: " + kind.encode() + b"\ndata: ", data, b"\n\n")

    def _completed(self, image: ImageData, usage: Any) -> JSONDict:
        return completed_event(self.req, image, usage)

    def close(self) -> None:
        """The client's answer is over: finished, or cut short (the client went away, or the answer was never read).
        Cut short, the relay stops feeding it."""
        if not self._finished:
            self._gone = True
            self.cancelled.set()
        self._ended("client")

    # Both sides.

    def _ended(self, side: str) -> None:
        with self._lock:
            if self._sides[side]:
                return
            self._sides[side] = True
            last = all(self._sides.values())
        if last:
            self._settle()

    def _settle(self) -> None:
        """Complete the usage row: the images the provider made are charged (their token usage where the price is by
        tokens), as for a request answered whole; anything else is refunded."""
        log = self.log
        made = self.result.data if self.result is not None else self.completed
        usage = (self.result.extra.get("usage") if self.result is not None
                 else usage_summed(self.completed_usage) if self.completed_usage else None)
        try:
            if self.claim is not None:  # its Idempotency-Key: a whole stream's images are repeated to its repeats
                if made and self.error is None:
                    answer: JSONDict = {"created": int(time.time()), "data": [{"b64_json": i.b64_json} for i in made]}
                    idempotency_keep(self.claim, {**answer, "usage": usage} if usage else answer)
                else:
                    idempotency_give_back(self.claim)
            if made:
                usage_delivered(log, row=self.row, multiplier=self.multiplier, images=len(made), usage=usage,
                                size=self.req.size, quality=self.req.quality)
                if self.error is not None:  # the stream broke after some images: they are charged, the fault kept
                    log.error_type, log.error_code = self.error.type, self.error.code or ""
                    log.error_message = self.error.message[:2000]
            else:
                usage_fail(log, self.error or StreamBroken("The stream ended before any image was made."))
            if self._gone:
                usage_departed(log, UsageLog.ClientGone.BEFORE if not self.delivered else UsageLog.ClientGone.AFTER)
            held = usage_close(log, attempts=self.attempts,
                               latency_ms=int((time.monotonic() - self.started) * 1000))
            record_request(log)
            usage_complete(log, held=held)
        finally:
            self.stack.close()
