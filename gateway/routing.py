"""Trying channels in order, safely: circuit breakers skip broken channels, channel limits are respected, rejected
keys are set aside, every attempt fits in the request's deadline, and a fault that may already have been billed is
not retried elsewhere unless the channel says that is safe."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import connection

from channels import adapters
from channels.adapters import ChannelTarget
from channels.models import key_fingerprint
from channels.services import channel_attempt_record, channel_key_reject, channel_key_works
from gateway import dispatch
from gateway.alerts import circuit_fault
from gateway.bookkeeping import best_effort
from gateway.hosting import images_deliver
from gateway.state import CircuitView, LeaseAsk, SharedState, Window, admitted, lease_ttl, shared_state
from gateway.usage import Attempt
from openopen8.core.errors import (
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamKeyRejected,
    UpstreamRefused,
    UpstreamTimeout,
)
from openopen8.core.schemas import ImageRequest, ImagesResponse

_rng = random.Random()
CLOSED = CircuitView()


def _all_failed(req: ImageRequest, tried: int, last: GatewayError) -> GatewayError:
    """The client's error when every channel failed: the class follows the last fault, the message names no key,
    host or channel."""
    message = f"No channel could serve model '{req.model}' ({tried} tried). Last error: {last.message}"
    if isinstance(last, UpstreamTimeout):
        return UpstreamTimeout(message, ambiguous=last.ambiguous)
    if isinstance(last, RateLimited):
        return ServiceUnavailable(message, retry_after=last.retry_after)
    return UpstreamError(message, ambiguous=last.ambiguous)


@contextmanager
def channel_slot(state: SharedState, target: ChannelTarget, images: int) -> Iterator[float | None]:
    """Hold the channel's limits for one attempt: yields ``None`` when within them, else seconds to wait."""
    per_minute, in_flight = target.images_per_minute, target.max_in_flight
    if per_minute is None and in_flight is None:
        yield None
        return
    window = Window(f"ipm:channel:{target.id}", images, per_minute) if per_minute is not None else None
    lease = LeaseAsk(f"inflight:channel:{target.id}", in_flight, lease_ttl()) if in_flight is not None else None
    with admitted(state, window=window, lease=lease) as admission:
        refused = admission.refused
        yield None if refused is None else admission.wait if refused == "window" else 1.0


def release_database() -> None:
    """Give the database connection back to the pool while waiting on a provider (seconds to a minute) or on a
    client's body, so requests in flight do not each hold one. Not inside a transaction, and only where a pool is
    there to take it back (PostgreSQL's, or the SQLite backend's)."""
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()


Call = Callable[..., tuple[ImagesResponse, int]]  # adapters.call's signature: (target, req, *, timeout)


def _attempt(target: ChannelTarget, req: ImageRequest, *, files_url: str, timeout: float,
             call: Call) -> tuple[ImagesResponse, int]:
    """One channel, start to finish: its images delivered as the client asked, and the provider's latency."""
    release_database()
    result, provider_ms = call(target, req, timeout=timeout)
    if not result.data:
        raise UpstreamError("The provider returned no images.", channel_fault=True)
    result = ImagesResponse(result.created, result.data[: req.n], result.extra)
    delivered = images_deliver(result, response_format=req.response_format, files_url=files_url,
                               ttl=settings.OPENOPEN8_IMAGE_TTL, timeout=timeout, trusted=target.base_url)
    return delivered, provider_ms


def _record(target: ChannelTarget, req: ImageRequest, started: float, *, provider_ms: int | None = None,
            error: GatewayError | None = None) -> Attempt:
    """The attempt, its outcome also written on the channel."""
    latency_ms = int((time.monotonic() - started) * 1000)
    best_effort(channel_attempt_record, target.id, latency_ms=latency_ms,
                error=error.message if error is not None else None)
    failure = (error.status, error.code, error.message[:500]) if error is not None else None
    return Attempt(target.id, target.name, target.provider_model(req.model), latency_ms, provider_ms, failure)


def _key_fault(state: SharedState, target: ChannelTarget, error: UpstreamKeyRejected) -> bool:
    """Whether a 401/403 is the key's fault: its code says so, or a probe of the key is refused too, or (for a
    provider without a probe) the key was refused more than twice in ten minutes."""
    if error.names_key:
        return True
    works = channel_key_works(target)
    if works is not None:
        return not works
    window = Window(f"keyrefused:{target.id}:{key_fingerprint(target.api_key)}", 1, 2, seconds=600)
    return state.admit(window=window, lease=None).refused is not None


def _after_failure(state: SharedState, target: ChannelTarget, view: CircuitView,
                   error: GatewayError) -> tuple[ChannelTarget | None, GatewayError]:
    """Book a failed attempt against the channel. Returns the same channel with another key to try, if the fault
    was a rejected key and the channel has one left; and the error to go on with (a provider's refusal of this
    request, though the key works, becomes the client's)."""
    if isinstance(error, UpstreamKeyRejected):
        if _key_fault(state, target, error):
            return channel_key_reject(target.id, key=target.api_key, reason=error.message), error
        return None, UpstreamRefused(f"The provider refused this request: {error.provider_message}")
    if dispatch.counts_against_circuit(error):
        best_effort(circuit_fault, state, target.id)
    elif not error.channel_fault and view != CLOSED:
        best_effort(state.circuit_ok, target.id)  # the provider answered sensibly: it works
    return None, error


def images_route(req: ImageRequest, targets: list[ChannelTarget], *, circuits: dict[int, CircuitView],
                 attempts: list[Attempt], files_url: str, deadline: float, end_user_id: str = "",
                 call: Call = adapters.call) -> ImagesResponse:
    """The client's images from the first channel of ``targets`` that delivers them, skipping those whose circuit
    is open; every channel tried is appended to ``attempts``.

    Raises the client's error as soon as a provider blames the request; ``UpstreamError``/``UpstreamTimeout``/
    ``ServiceUnavailable`` when every channel failed; ``RateLimited`` (429) with ``Retry-After`` when the channels
    are at their limits, ``ServiceUnavailable`` (503) with ``Retry-After`` when they are cooling down after faults;
    ``UpstreamTimeout`` when the deadline (monotonic) passes. ``end_user_id`` is what a channel that sends the
    token's id as the end user sends. ``call`` makes one channel's call (a stream's relays events as they come).
    """
    state, max_attempts = shared_state(), settings.OPENOPEN8_MAX_ATTEMPTS
    now = time.time()
    waits = [v.open_until - now for v in circuits.values() if v.state(now) == "open" and v.open_until]
    limit_waits: list[float] = []
    ready = [t for t in targets if circuits.get(t.id, CLOSED).state(now) != "open"]
    queue = dispatch.plan_attempts(ready, rng=_rng, max_attempts=len(ready))
    tried, last_error = 0, None
    while queue and tried < max_attempts:
        target = queue.pop(0)
        view = circuits.get(target.id, CLOSED)
        remaining = deadline - time.monotonic()
        if remaining < 0.5:
            raise UpstreamTimeout(f"The request's deadline of {settings.OPENOPEN8_REQUEST_DEADLINE:g} s passed "
                                  f"after {tried} attempt(s).")
        timeout = min(target.timeout or settings.OPENOPEN8_UPSTREAM_TIMEOUT, remaining)
        if view.state(time.time()) == "half_open" and not state.claim_probe(target.id, ttl=timeout + 30):
            continue  # another request is probing this channel
        with channel_slot(state, target, req.n) as wait:
            if wait is not None:
                limit_waits.append(wait)
                continue
            tried += 1
            started = time.monotonic()
            try:
                result, provider_ms = _attempt(target, dispatch.with_end_user(req, target, token_id=end_user_id),
                                               files_url=files_url, timeout=timeout, call=call)
            except GatewayError as error:
                attempts.append(_record(target, req, started, error=error))
                retry_with, error = _after_failure(state, target, view, error)
                if retry_with is not None:
                    queue.insert(0, retry_with)
                left = min(len(queue), max_attempts - tried)
                if dispatch.should_fail_over(error, attempts_left=left, safe_to_retry=target.safe_to_retry):
                    last_error = error
                    continue
                if error.channel_fault:
                    raise _all_failed(req, tried, error) from error
                raise error from None
        if view != CLOSED:
            best_effort(state.circuit_ok, target.id)
        attempts.append(_record(target, req, started, provider_ms=provider_ms))
        return result
    if last_error is not None:
        raise _all_failed(req, tried, last_error)
    if limit_waits:
        raise RateLimited(f"Every channel for model '{req.model}' is at its rate or concurrency limit; try again "
                          "shortly.", retry_after=max(1, math.ceil(min(limit_waits))))
    raise ServiceUnavailable(f"Every channel for model '{req.model}' is cooling down after failures; try again "
                             "shortly.", retry_after=max(1, math.ceil(min(waits, default=1))))
