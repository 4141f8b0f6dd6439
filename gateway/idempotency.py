"""``Idempotency-Key`` on image requests: a repeat of a request that succeeded (same API key, same header, same
content, within OPENOPEN8_IDEMPOTENCY_TTL) gets the first answer again instead of new images and a new charge; a
repeat while the first still runs waits for it; the same header on other content is refused.

Only successes are kept: a request that failed charged nothing, so its key is given back and a retry tries again.
A claim whose request died (its worker killed) is taken over once the request's deadline has long passed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from gateway.models import ApiToken, IdempotentRequest
from gateway.routing import release_database
from openopen8.core.errors import Conflict, InvalidRequest, Unprocessable
from openopen8.core.schemas import ImageRequest, JSONDict

KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces, as the header's value
POLL = 0.2  # seconds between looks at a claim another request holds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """This request holds the key: it records its answer, or gives the key back."""

    pk: int
    request_id: str


@dataclass(frozen=True)
class Replay:
    """The answer of the request that held the key first (for a streamed request, ``stream`` is the request, whose
    answer is given again as events)."""

    status: int
    answer: str
    request_id: str
    stream: ImageRequest | None = None


def idempotency_key(header: str | None) -> str:
    """The request's ``Idempotency-Key``, or "" without one. Raises ``InvalidRequest`` for a malformed one."""
    if header is None:
        return ""
    if not KEY.fullmatch(header):
        raise InvalidRequest("The Idempotency-Key header must be 1 to 255 printable ASCII characters without spaces.",
                             code="invalid_idempotency_key")
    return header


def fingerprint(req: ImageRequest) -> str:
    """A hash of what the request asks: its endpoint, fields and input images' bytes. A multipart body's boundary
    and file names are not part of it, so an SDK's retry of the same call matches."""
    digest = hashlib.sha256()
    digest.update(json.dumps([req.endpoint, req.fields], sort_keys=True, default=str).encode())
    inputs = [*req.images, *(f for f in (req.mask, req.markup) if f is not None)]
    for image in inputs:
        image.file.seek(0)
        while chunk := image.file.read(1 << 16):
            digest.update(chunk)
        image.file.seek(0)
        digest.update(b"\0")
    return digest.hexdigest()


def idempotency_claim(*, token: ApiToken, key: str, print_: str, request_id: str, wait: float) -> Claim | Replay:
    """Take the key for this request, or get the answer of the request that holds it, waiting up to ``wait`` seconds
    while that one runs. Raises ``Unprocessable`` (422) when the key named other content, ``Conflict`` (409) when
    the holder is still running after the wait."""
    give_up = time.monotonic() + wait
    kept, stale = (timedelta(seconds=settings.OPENOPEN8_IDEMPOTENCY_TTL),
                   timedelta(seconds=settings.OPENOPEN8_REQUEST_DEADLINE + settings.OPENOPEN8_SWEEP_GRACE))
    while True:
        now = timezone.now()
        try:
            with transaction.atomic():  # a savepoint where a transaction is open: the refusal must not end it
                created = IdempotentRequest.objects.create(token=token, key=key, fingerprint=print_,
                                                           request_id=request_id, claimed_at=now)
            return Claim(created.pk, request_id)
        except IntegrityError:
            pass
        row = IdempotentRequest.objects.filter(token=token, key=key).first()
        if row is None:
            continue  # given back meanwhile
        expired = row.answered_at < now - kept if row.answered_at is not None else row.claimed_at < now - stale
        if expired:  # an old answer, or a claim whose request died: this request takes the key
            taken = IdempotentRequest.objects.filter(pk=row.pk, request_id=row.request_id).update(
                fingerprint=print_, request_id=request_id, claimed_at=now, answered_at=None, status_code=None,
                answer="")
            if taken:
                return Claim(row.pk, request_id)
            continue
        if row.fingerprint != print_:
            raise Unprocessable("This Idempotency-Key was used for a different request; use a new key for new "
                                "content.", code="idempotency_key_reused")
        if row.answered_at is not None and row.status_code is not None:
            return Replay(row.status_code, row.answer, row.request_id)
        if time.monotonic() >= give_up:
            raise Conflict("A request with this Idempotency-Key is still running; retry to get its answer.",
                           code="idempotency_key_in_use", retry_after=1)
        release_database()
        time.sleep(POLL)


def idempotency_answered(claim: Claim, answer: JSONDict, *, status: int = 200) -> None:
    """Keep the answer of the request that holds the key, for its repeats."""
    IdempotentRequest.objects.filter(pk=claim.pk, request_id=claim.request_id).update(
        answered_at=timezone.now(), status_code=status, answer=json.dumps(answer, separators=(",", ":")))


def idempotency_release(claim: Claim) -> None:
    """Give the key back: the request failed, and a retry with it may try again."""
    IdempotentRequest.objects.filter(pk=claim.pk, request_id=claim.request_id, answered_at=None).delete()


def idempotency_keep(claim: Claim, answer: JSONDict, *, status: int = 200) -> None:
    """``idempotency_answered``, never raising for the database: the client still gets its answer, and a repeat
    waits, then takes the key over."""
    try:
        idempotency_answered(claim, answer, status=status)
    except DatabaseError as error:
        logger.warning("the answer of request %s was not kept for its Idempotency-Key (%s)", claim.request_id,
                       type(error).__name__)


def idempotency_give_back(claim: Claim) -> None:
    """``idempotency_release``, never raising for the database: the claim is taken over once it is stale."""
    try:
        idempotency_release(claim)
    except DatabaseError as error:
        logger.warning("the Idempotency-Key of request %s was not given back (%s)", claim.request_id,
                       type(error).__name__)


def idempotency_purge() -> int:
    """Delete the keys whose answers are past keeping, and claims long dead; return how many."""
    now = timezone.now()
    kept = now - timedelta(seconds=settings.OPENOPEN8_IDEMPOTENCY_TTL)
    deleted, _ = IdempotentRequest.objects.filter(claimed_at__lt=kept).filter(
        answered_at__isnull=True).delete()
    answered, _ = IdempotentRequest.objects.filter(answered_at__lt=kept).delete()
    return deleted + answered
