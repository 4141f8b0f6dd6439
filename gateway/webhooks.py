"""Job webhooks: a finished job is POSTed to its ``callback_url``, signed as Standard Webhooks specify
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``
with the key's ``whsec_`` secret), so the ``standardwebhooks`` libraries and OpenAI's webhook helper verify it.
A delivery that gets no 2xx is tried again after each of OPENOPEN8_WEBHOOK_RETRIES seconds; every try is recorded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.utils import timezone

from gateway.jobs import job_object
from gateway.models import ApiToken, ImageJob, WebhookDelivery
from openopen8.core import http
from openopen8.core.errors import GatewayError, InvalidRequest
from openopen8.core.http_pool import url_refused

PREFIX = "whsec_"


def webhook_secret_new() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_secret(token: ApiToken) -> str:
    """The key's signing secret, made the first time it is needed."""
    if not token.webhook_secret:
        token.webhook_secret = webhook_secret_new()
        ApiToken.objects.filter(pk=token.pk, webhook_secret="").update(webhook_secret=token.webhook_secret)
        token.webhook_secret = ApiToken.objects.get(pk=token.pk).webhook_secret  # another request may have won
    return str(token.webhook_secret)


def webhook_secret_rotate(token: ApiToken) -> str:
    token.webhook_secret = webhook_secret_new()
    token.save(update_fields=["webhook_secret"])
    return str(token.webhook_secret)


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, msg_id: str, body: bytes) -> dict[str, str]:
    """The headers of a JSON webhook body, signed with ``secret`` when there is one."""
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "User-Agent": "OpenOpen8-Webhooks", "webhook-id": msg_id,
               "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = signature(secret, msg_id, timestamp, body)
    return headers


def callback_checked(value: object) -> str:
    """A client's ``callback_url``: an http(s) URL to a public address. Raises ``InvalidRequest``."""
    if not isinstance(value, str) or len(value) > 2000:
        raise InvalidRequest("'callback_url' must be an http(s) URL of at most 2000 characters.", param="callback_url")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("'callback_url' must be an http(s) URL.", param="callback_url")
    if url_refused(value):
        raise InvalidRequest("'callback_url' points to a private or local address, which this gateway does not "
                             "connect to.", param="callback_url")
    return value


def webhook_deliver(job_id: str, attempt: int) -> float | None:
    """Try to deliver the finished job to its callback URL once; record the try. Return the seconds after which to
    try again, or ``None`` (delivered, given up, or nothing to deliver)."""
    job = ImageJob.objects.select_related("token").filter(pk=job_id).first()
    if job is None or not job.callback_url:
        return None
    body = json.dumps(job_object(job), separators=(",", ":")).encode()
    headers = signed_headers(webhook_secret(job.token), f"msg_{job.id}", body)
    started, status, error = time.monotonic(), None, ""
    try:
        status = http.post_callback(job.callback_url, body, headers=headers,
                                    timeout=settings.OPENOPEN8_WEBHOOK_TIMEOUT)
    except GatewayError as failure:
        error = failure.message[:500]
    delivered = status is not None and 200 <= status < 300
    retries = settings.OPENOPEN8_WEBHOOK_RETRIES
    again = None if delivered or attempt > len(retries) else retries[attempt - 1]
    WebhookDelivery.objects.create(job=job, attempt=attempt, status_code=status, error=error, delivered=delivered,
                                   duration_ms=int((time.monotonic() - started) * 1000),
                                   next_attempt_at=timezone.now() + timedelta(seconds=again) if again else None)
    return again
