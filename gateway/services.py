"""The request path: check, reserve, try channels in order, deliver, settle, log."""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, InterfaceError, OperationalError, connections
from django.utils import timezone

from channels import adapters
from channels.adapters import ChannelTarget
from channels.models import Channel
from gateway import dispatch
from gateway.alerts import budget_refused
from gateway.bookkeeping import best_effort
from gateway.cache import ConfigSnapshot, config_snapshot
from gateway.idempotency import (
    Claim,
    Replay,
    fingerprint,
    idempotency_claim,
    idempotency_give_back,
    idempotency_keep,
    idempotency_key,
)
from gateway.jobs import (
    job_admit,
    job_beat,
    job_calling,
    job_create,
    job_failed,
    job_inputs,
    job_object,
    job_of,
    job_requeue,
    job_stale,
    job_start,
    job_succeeded,
    job_wait,
    new_job_id,
)
from gateway.metrics import record_request
from gateway.models import ApiToken, ImageJob, UsageLog, new_key
from gateway.pricing import Ask, hold_micros, with_multiplier
from gateway.routing import images_route, release_database
from gateway.selectors import channel_targets_for, price_for
from gateway.state import LeaseAsk, Window, admitted, lease_ttl, shared_state
from gateway.streaming import StreamAnswer
from gateway.tasks import job_enqueue
from gateway.uploads import attach_inputs, from_json, from_multipart
from gateway.usage import (
    Attempt,
    usage_body,
    usage_close,
    usage_delivered,
    usage_departed,
    usage_describe,
    usage_fail,
    usage_inputs,
    usage_new,
    usage_price,
    usage_replayed,
)
from gateway.usage_sql import usage_insert, usage_insert_holding
from gateway.usage_writers import usage_complete, usage_write
from gateway.webhooks import callback_checked
from openopen8.client import ClientConnection
from openopen8.core.errors import (
    GatewayError,
    InsufficientQuota,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    UpstreamTimeout,
    database_unavailable,
)
from openopen8.core.rules import check_request
from openopen8.core.schemas import ImageRequest, ImagesResponse, JSONDict

logger = logging.getLogger(__name__)


@contextmanager
def token_slot(token: ApiToken, *, counted: bool = True) -> Iterator[None]:
    """Hold the token's limits for one request (``counted=False``: its place in flight only, for a job whose
    request was counted when it was submitted). Raises ``RateLimited`` (429, with Retry-After) when over one; a
    request refused by one limit uses up nothing of the other."""
    rpm, in_flight = token.requests_per_minute if counted else None, token.max_in_flight
    if rpm is None and in_flight is None:
        yield
        return
    window = Window(f"rpm:token:{token.pk}", 1, rpm) if rpm is not None else None
    lease = LeaseAsk(f"inflight:token:{token.pk}", in_flight, lease_ttl()) if in_flight is not None else None
    with admitted(shared_state(), window=window, lease=lease) as admission:
        if admission.refused == "window":
            raise RateLimited(f"Rate limit reached for this API key: {rpm} requests per minute. Try again shortly.",
                              retry_after=max(1, math.ceil(admission.wait)))
        if admission.refused == "lease":
            raise RateLimited(f"This API key already has {in_flight} request(s) running; wait for one to finish.",
                              retry_after=1)
        yield


_uploads: dict[int, int] = {}  # per token, the bodies arriving at this process now
_uploads_lock = threading.Lock()


@contextmanager
def upload_slot(token: ApiToken) -> Iterator[None]:
    """Hold one of the token's places for a body arriving at this process. Raises ``RateLimited`` when the token
    has OPENOPEN8_MAX_UPLOADS_PER_KEY arriving already: slow uploads from one key cannot take every connection
    a worker has."""
    limit = settings.OPENOPEN8_MAX_UPLOADS_PER_KEY
    with _uploads_lock:
        arriving = _uploads.get(token.pk, 0)
        if arriving >= limit:
            raise RateLimited(f"This API key already has {limit} request bodies arriving at once; wait for them "
                              "to finish.", retry_after=1)
        _uploads[token.pk] = arriving + 1
    try:
        yield
    finally:
        with _uploads_lock:
            if _uploads[token.pk] <= 1:
                del _uploads[token.pk]
            else:
                _uploads[token.pk] -= 1


def _check(token: ApiToken, body: Any, files: Any, *, endpoint: str, log: UsageLog, stack: ExitStack) -> ImageRequest:
    """The checked request with its input images decoded and attached. Raises ``InvalidRequest`` or, for a model
    the token may not use, ``PermissionDenied`` (before any upload is decoded)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    req = check_request(body, endpoint=endpoint)
    usage_describe(log, req)
    if not token.allows(req.model):
        raise PermissionDenied(f"This API key is not allowed to use model '{req.model}'.", param="model")
    if endpoint == "generations":
        return req
    raw = from_multipart(files) if files is not None else from_json(body)
    log.input_images = raw.count  # counted before decoding, so a request refused for its files still shows them
    req = attach_inputs(req, raw, stack=stack)
    usage_inputs(log, req)
    return req


def _targets(config: ConfigSnapshot, req: ImageRequest, token: ApiToken) -> list[ChannelTarget]:
    """The channels that can serve this request (the demo channel only for a key that pays nothing). Raises
    ``ModelNotFound`` when no channel serves the model, and ``InvalidRequest`` when channels serve it but none can do
    this endpoint with these inputs."""
    targets = channel_targets_for(config, model=req.model)
    if any(t.demo for t in targets) and _pays(token):
        targets = [t for t in targets if not t.demo]
        if not targets:
            raise ModelNotFound(f"The model '{req.model}' is served only by the demo channel, which does not serve "
                                "API keys with a budget.", param="model", code="model_not_found")
    if not targets and any(c.serves(req.model) for c in Channel.objects.filter(enabled=False)):
        # Not an unknown model: the operator (or the gateway, after faults) turned its channels off.
        raise ServiceUnavailable(f"The model '{req.model}' is served only by channels that are disabled right now; "
                                 "try again later.", code="model_unavailable", retry_after=60)
    if not targets:
        raise ModelNotFound(f"The model '{req.model}' does not exist or you do not have access to it.", param="model")
    files = {name for name, f in (("image", req.images), ("mask", req.mask), ("markup", req.markup)) if f}
    able = dispatch.capable(targets, endpoint=req.endpoint, input_images=len(req.images), file_fields=files)
    if not able:
        extra = f" with {len(req.images)} input images" if len(req.images) > 1 else ""
        extra += f" and a {' and a '.join(sorted(files - {'image'}))}" if files - {"image"} else ""
        raise InvalidRequest(f"No channel for model '{req.model}' can serve image {req.endpoint}{extra}.",
                             param="model", code="unsupported_model")
    return able


def images_create(*, token: ApiToken, config: ConfigSnapshot, endpoint: str, read: Callable[[], tuple[Any, Any]],
                  request_id: str, files_url: str, client: ClientConnection | None = None,
                  idempotency: str | None = None, asynchronous: bool = False) -> JSONDict | StreamAnswer | Replay:
    """Serve one image request (generations, edits or variations) end to end; return OpenAI's response body.

    ``read`` reads and parses the body: the fields, and a multipart request's files (``None`` for JSON). It is
    called once the token's limits have let the request in, so a key over its limits has no body read at all, and
    only so many of a key's bodies arrive at once. Raises ``GatewayError``: ``InvalidRequest`` (400)
    for a failed check, ``PermissionDenied`` (403) for a model the token may not use, ``ModelNotFound`` (404),
    ``InsufficientQuota`` (429), or the provider's mapped error. Whatever happens, one usage row records it, nothing
    is charged for images that were not delivered, and temporary files are closed.

    With ``stream: true`` the answer is a ``StreamAnswer`` (gateway/streaming.py) once the pending row is written:
    it tries the channels itself, and completes the row when the stream ends.

    ``idempotency`` is the request's ``Idempotency-Key`` header: a repeat of a request of the token that succeeded
    gets a ``Replay`` of its answer (gateway/idempotency.py), recorded on its row as such and charged nothing.

    ``asynchronous`` (``Prefer: respond-async``): once checked and held, the request becomes an image job
    (gateway/jobs.py) and the answer is the job (a ``Replay`` with status 202); ``job_run`` serves it later and
    completes its row.

    ``client`` is the client's connection, where the server can tell whether it went away: a client that left before
    its images were ready, or before the answer reached it, is recorded on the row, and charged or not as
    OPENOPEN8_CHARGE_DEPARTED_CLIENTS says (the provider made, and billed, those images). A successful row is then
    written once the server knows whether the answer was delivered.
    """
    started = time.monotonic()
    log = usage_new(token=token, endpoint=endpoint, request_id=request_id)
    attempts: list[Attempt] = []
    streamed: StreamAnswer | None = None
    claim: Claim | None = None
    job: ImageJob | None = None
    try:
        with ExitStack() as stack:
            stack.enter_context(token_slot(token))
            with upload_slot(token):
                release_database()  # a body may take its time to arrive: it must not hold a pooled connection
                body, files = read()
            usage_body(log, body)
            # Where a job's end is POSTed: the gateway's field, never a provider's.
            callback = body.pop("callback_url", None) if isinstance(body, dict) else None
            req = _check(token, body, files, endpoint=endpoint, log=log, stack=stack)
            if asynchronous and req.stream:
                raise InvalidRequest("A streamed request cannot be an image job; drop stream or Prefer: "
                                     "respond-async.", param="stream")
            if callback is not None and not asynchronous:
                raise InvalidRequest("'callback_url' is for image jobs: send the header Prefer: respond-async too.",
                                     param="callback_url")
            callback_url = callback_checked(callback) if callback is not None else ""
            key = idempotency_key(idempotency)
            if key:
                held_by = idempotency_claim(token=token, key=key, print_=fingerprint(req), request_id=request_id,
                                            wait=settings.OPENOPEN8_REQUEST_DEADLINE)
                if isinstance(held_by, Replay):
                    usage_replayed(log, held_by.request_id, status=held_by.status)
                    if held_by.status == 202:
                        return _replayed_job(token, held_by)
                    return replace(held_by, stream=req) if req.stream else held_by
                claim = held_by
            targets = _targets(config, req, token)
            if asynchronous:
                job_admit(token)
                log.job_id = new_job_id()
            row = price_for(config, model=req.model, size=req.size, quality=req.quality, at=log.created_at)
            multiplier = token.group.multiplier if token.group is not None else Decimal(1)
            usage_price(log, row, multiplier)
            if log.budget_period is not None or log.group_period is not None:
                ask = Ask(n=req.n, size=req.size, quality=req.quality, prompt_chars=len(req.prompt or ""),
                          input_images=len(req.images), calls=req.n)
                _write_pending(log, hold=with_multiplier(hold_micros(row, ask), multiplier))
            else:
                _write_pending(log, hold=0)
            if asynchronous:
                job = job_create(job_id=log.job_id, token=token, request_id=request_id, body=body, req=req,
                                 files_url=files_url, callback_url=callback_url)
                job_enqueue(job.id)
                accepted = Replay(202, json.dumps(job_object(job)), request_id)
                if claim is not None:
                    idempotency_keep(claim, job_object(job), status=202)
                    claim = None
                return accepted
            if req.stream:
                streamed = StreamAnswer(req=req, targets=targets, config=config, log=log, row=row,
                                        multiplier=multiplier, files_url=files_url, started=started,
                                        end_user_id=_end_user_id(token, targets), attempts=attempts,
                                        stack=stack.pop_all(), claim=claim)
                claim = None  # the stream keeps its answer for the key, or gives the key back, when it ends
                streamed.start()
                release_database()
                return streamed
            result = images_route(req, targets, circuits=config.circuits_for([t.id for t in targets]),
                                  attempts=attempts, files_url=files_url, end_user_id=_end_user_id(token, targets),
                                  deadline=started + settings.OPENOPEN8_REQUEST_DEADLINE)
        usage_delivered(log, row=row, multiplier=multiplier, images=len(result.data), usage=result.extra.get("usage"),
                        size=req.size, quality=req.quality)
        if client is not None and client.gone():
            usage_departed(log, UsageLog.ClientGone.BEFORE)
        answer = result.to_dict()
        if claim is not None:
            idempotency_keep(claim, answer)
            claim = None
        return answer
    except GatewayError as error:
        usage_fail(log, error)
        _unsubmit(job, error)
        if isinstance(error, InsufficientQuota):
            best_effort(budget_refused, token.pk, error.budget_of)
        raise
    except (OperationalError, InterfaceError) as error:
        unavailable = database_unavailable()
        usage_fail(log, unavailable)
        raise unavailable from error
    except Exception:
        usage_fail(log, GatewayError("Internal error."))
        _unsubmit(job, GatewayError("Internal error."))
        raise
    finally:
        if claim is not None:  # the request failed: nothing was charged, so a retry with the key may try again
            idempotency_give_back(claim)
        submitted = log.status == UsageLog.Status.PENDING and log.job_id
        if streamed is None and not submitted:  # a stream's row, or a job's, is completed when it ends
            held = usage_close(log, attempts=attempts, latency_ms=int((time.monotonic() - started) * 1000))
            record_request(log)
            # A token without a budget holds nothing and is not written at all: its usage rows are its ledger, so
            # its requests do not queue on its one row.
            if not (log.status == UsageLog.Status.SUCCESS and client is not None
                    and client.on_delivery(lambda delivered: _delivered(log, held, delivered))):
                usage_complete(log, held=held)


def _delivered(log: UsageLog, held: int, delivered: bool) -> None:
    """The completion of a request whose answer the server has written, or failed to: after Django finished the
    request, so the connection it takes goes back to the pool here."""
    try:
        if not delivered:
            usage_departed(log, UsageLog.ClientGone.AFTER)
        usage_complete(log, held=held)
    finally:
        connections[DEFAULT_DB_ALIAS].close()


def _unsubmit(job: ImageJob | None, error: GatewayError) -> None:
    """A job made before its submission failed never runs."""
    if job is not None:
        job_failed(job, error, was=(ImageJob.Status.QUEUED,))


def _replayed_job(token: ApiToken, replay: Replay) -> Replay:
    """A repeated submission gets the job as it is now, not as it was submitted."""
    job = job_of(token, json.loads(replay.answer)["id"])
    return Replay(202, json.dumps(job_object(job)), replay.request_id)


def _end_user_id(token: ApiToken, targets: list[ChannelTarget]) -> str:
    """The token's id for providers, made only when a channel of this request sends it (it is a keyed hash)."""
    return token.end_user_id() if any(t.end_user == "token" for t in targets) else ""


def _pays(token: ApiToken) -> bool:
    """Whether the key has a budget, or is in a group with one."""
    return token.budget_micros is not None or (token.group is not None and token.group.budget_micros is not None)


def _write_pending(log: UsageLog, *, hold: int) -> None:
    """Write the pending row, with the budget holds in the same transaction (or none). Raises
    ``InsufficientQuota`` when a budget does not cover the hold."""
    if hold:
        usage_insert_holding(log, micros=hold)
    else:
        usage_insert(log)


def token_create(*, name: str, budget_micros: int | None = None, allowed_models: str = "",
                 expires_at: Any = None, token: ApiToken | None = None) -> tuple[ApiToken, str]:
    """Create (or finish creating) a token with a new key; return it and the key, which is never shown again."""
    key = new_key()
    token = token or ApiToken(name=name, budget_micros=budget_micros, allowed_models=allowed_models,
                              expires_at=expires_at)
    token.set_key(key)
    token.save()
    return token, key


JOB_HOLD_S = 10.0  # a running job waits this long for a place in flight before it goes back to the queue
JOB_RETRY_S = 0.25
_places_freed = threading.Condition()


class JobCancelled(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "job_cancelled"


def job_run(job_id: str) -> None:
    """Run an image job (a task of gateway/tasks.py): its request served as a synchronous one is, its row completed,
    its answer kept on the job. A job whose channels are at their limits, or cooling down, goes back to the queue
    for as long as OPENOPEN8_JOB_MAX_WAIT allows; a cancelled one stops before its next provider call."""
    job = job_start(job_id)
    if job is None:
        return  # cancelled, or another runner has it
    token, config, started = job.token, config_snapshot(), time.monotonic()
    log = UsageLog.objects.get(request_id=job.request_id)
    attempts: list[Attempt] = []
    waiting = False

    def call(target: ChannelTarget, req: ImageRequest, *, timeout: float) -> tuple[ImagesResponse, int]:
        if ImageJob.objects.filter(pk=job_id, cancel_requested=True).exists():
            raise JobCancelled("The job was cancelled.")
        job_calling(job_id, target.id)
        release_database()
        return adapters.call(target, req, timeout=timeout)

    try:
        with ExitStack() as stack:
            stack.enter_context(_beating(job_id))
            req = _check(token, dict(job.body), job_inputs(job), endpoint=job.endpoint, log=log, stack=stack)
            targets = _targets(config, req, token)
            row = price_for(config, model=req.model, size=req.size, quality=req.quality, at=log.created_at)
            multiplier = token.group.multiplier if token.group is not None else Decimal(1)
            held_until = started + JOB_HOLD_S
            while True:
                try:
                    with token_slot(token, counted=False):
                        result = images_route(req, targets, circuits=config.circuits_for([t.id for t in targets]),
                                              attempts=attempts, files_url=job.files_url, call=call,
                                              end_user_id=_end_user_id(token, targets),
                                              deadline=started + settings.OPENOPEN8_REQUEST_DEADLINE)
                except RateLimited as busy:
                    # A place in flight frees within moments: look again when a job of this process ends (or soon,
                    # for one ending elsewhere), keeping this runner's place, rather than have every runner take
                    # and put back queued jobs meanwhile.
                    if (busy.retry_after or 5) > 2 or time.monotonic() > held_until:
                        raise
                    with _places_freed:
                        _places_freed.wait(JOB_RETRY_S * random.uniform(0.5, 1.5))
                    continue
                except BaseException:
                    _freed()
                    raise
                _freed()
                break
        usage_delivered(log, row=row, multiplier=multiplier, images=len(result.data), usage=result.extra.get("usage"),
                        size=req.size, quality=req.quality)
        job_succeeded(job, result.to_dict())
    except (RateLimited, ServiceUnavailable) as busy:  # the key's or the channels' limits: wait in the queue
        waiting = job_wait(job, seconds=busy.retry_after or 5)
        if waiting:
            job_enqueue(job_id, after=busy.retry_after or 5)
        else:
            usage_fail(log, busy)
            job_failed(job, busy)
    except GatewayError as error:
        usage_fail(log, error)
        job_failed(job, error, status=ImageJob.Status.CANCELLED if isinstance(error, JobCancelled)
                   else ImageJob.Status.FAILED)
    except Exception as error:
        failure = database_unavailable() if isinstance(error, (OperationalError, InterfaceError)) \
            else GatewayError("Internal error.")
        logger.exception("image job %s failed", job_id)
        usage_fail(log, failure)
        job_failed(job, failure)
    finally:
        if not waiting:
            held = usage_close(log, attempts=attempts, latency_ms=int((time.monotonic() - started) * 1000))
            record_request(log)
            usage_complete(log, held=held)


def _freed() -> None:
    """A job's places in flight are free again: the jobs of this process waiting for one look now."""
    with _places_freed:
        _places_freed.notify_all()


@contextmanager
def _beating(job_id: str) -> Iterator[None]:
    """Renew the running job's heartbeat while the block runs, so sweepers know its runner lives."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(settings.OPENOPEN8_JOB_LEASE / 3):
            try:
                job_beat(job_id)
            except DatabaseError:
                pass  # the next beat tries again; a lease runs out only after three missed
            finally:
                connections[DEFAULT_DB_ALIAS].close()

    thread = threading.Thread(target=beat, name=f"job {job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def job_cancel(token: ApiToken, job_id: str) -> JSONDict:
    """Cancel the token's job: a queued one ends at once, refunded; a running one stops before its next provider
    call (a call under way finishes, and what it made is charged and kept)."""
    job = job_of(token, job_id)
    cancelled = JobCancelled("The job was cancelled.")
    if job_failed(job, cancelled, status=ImageJob.Status.CANCELLED, was=(ImageJob.Status.QUEUED,)):
        _settle_unrun(job, cancelled)
    else:
        ImageJob.objects.filter(pk=job.pk, status=ImageJob.Status.RUNNING).update(cancel_requested=True)
    return job_object(job_of(token, job_id))


def _settle_unrun(job: ImageJob, error: GatewayError) -> None:
    """Complete the row of a job that ended without delivering: failed, its hold refunded."""
    log = UsageLog.objects.get(request_id=job.request_id)
    usage_fail(log, error)
    held = usage_close(log, attempts=[], latency_ms=int((timezone.now() - log.created_at).total_seconds() * 1000))
    record_request(log)
    usage_write(log, held=held)


def jobs_sweep() -> int:
    """Take care of jobs whose runner died: back to the queue if it had asked no provider yet (or only a channel
    marked safe to retry), else (the provider may have made and billed images) failed and refunded once the run's
    deadline has passed. Return how many."""
    now, handled = timezone.now(), 0
    for job in job_stale(now):
        # The images are asked for again only where no provider was asked, or where the operator said a repeat is safe.
        safe = job.called_channel is not None and job.called_channel.safe_to_retry
        if job.provider_called_at is None or safe:
            if job_requeue(job):
                job_enqueue(job.id)
                handled += 1
            continue
        if job.started_at is not None and now - job.started_at < timedelta(
                seconds=settings.OPENOPEN8_REQUEST_DEADLINE):
            continue
        lost = UpstreamTimeout("The job's runner stopped while a provider was making its images; nothing was "
                               "charged.", ambiguous=True)
        if job_failed(job, lost):
            _settle_unrun(job, lost)
            handled += 1
    return handled
