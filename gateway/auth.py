"""Bearer-token authentication against hashed API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from gateway.bookkeeping import best_effort
from gateway.cache import ConfigSnapshot, config_snapshot
from gateway.metrics import record_auth_failure
from gateway.models import ApiToken, FailedAuthentication, key_prefix
from openopen8.core.errors import NO_API_KEY

if TYPE_CHECKING:  # rest_framework.views imports this module through its settings
    from rest_framework.views import APIView

MIN_KEY_LENGTH = 3 + 32
LAST_USED_RESOLUTION_S = 60


def _mask(key: str) -> str:
    return f"{key[:6]}***{key[-4:]}" if len(key) > 12 else "***"


@dataclass(frozen=True)
class ApiAccess:
    """What an authenticated request carries (``request.auth``): its token, and the configuration it was found in,
    which the rest of the request reads."""

    token: ApiToken
    config: ConfigSnapshot


class BearerTokenAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiToken, ApiAccess] | None:
        """The token and its ``ApiAccess`` for ``Authorization: Bearer sk-…``; ``None`` when no header was sent.

        Raises DRF's ``AuthenticationFailed`` (401) for a malformed, unknown, disabled or expired key.
        """
        parts = get_authorization_header(request).split()
        if not parts:
            return None
        if parts[0].lower() != b"bearer" or len(parts) != 2:
            _refused("", FailedAuthentication.Reason.MALFORMED)
            raise AuthenticationFailed(NO_API_KEY)
        key = parts[1].decode("latin-1")
        token, config = None, config_snapshot()
        if key.startswith("sk-") and len(key) >= MIN_KEY_LENGTH:
            token = next((t for t in config.tokens_with_prefix(key_prefix(key)) if t.matches(key)), None)
        if token is None:
            _refused(key, FailedAuthentication.Reason.UNKNOWN)
            raise AuthenticationFailed(f"Incorrect API key provided: {_mask(key)}.")
        if not token.enabled:
            _refused(key, FailedAuthentication.Reason.DISABLED, token.pk)
            raise AuthenticationFailed("This API key has been disabled.")
        if token.is_expired():
            _refused(key, FailedAuthentication.Reason.EXPIRED, token.pk)
            raise AuthenticationFailed("This API key has expired.")
        now = timezone.now()
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > LAST_USED_RESOLUTION_S:
            best_effort(_touch, token.pk, now)
            token.last_used_at = now  # the cached copy too, or every request would write it
        return token, ApiAccess(token, config)

    def authenticate_header(self, request: Request) -> str:
        # Without it DRF answers 403 instead of 401 for a missing key.
        return self.keyword


def _touch(token_id: int, now: datetime) -> None:
    ApiToken.objects.filter(pk=token_id).update(last_used_at=now)


def _refused(key: str, reason: str, token_id: int | None = None) -> None:
    """Count a refused key, by its beginning only, off the answer's path."""
    start = f"sk-{key_prefix(key)}" if key.startswith("sk-") else "(not sk-)" if key else "(none)"
    record_auth_failure(reason)
    best_effort(_count_refusal, start, reason, token_id, timezone.now())


def _count_refusal(start: str, reason: str, token_id: int | None, now: datetime) -> None:
    counted = FailedAuthentication.objects.filter(key_start=start, reason=reason).update(
        count=F("count") + 1, last_at=now, token_id=token_id)
    if not counted:
        try:
            with transaction.atomic():
                FailedAuthentication.objects.create(key_start=start, reason=reason, token_id=token_id, count=1,
                                                    first_at=now, last_at=now)
        except IntegrityError:  # another worker made the row first
            FailedAuthentication.objects.filter(key_start=start, reason=reason).update(count=F("count") + 1,
                                                                                       last_at=now)


class HasApiToken(BasePermission):
    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, ApiAccess)
