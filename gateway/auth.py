"""Bearer-token authentication against hashed API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from gateway.bookkeeping import best_effort
from gateway.cache import ConfigSnapshot, config_snapshot
from gateway.models import ApiToken, key_prefix
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
            raise AuthenticationFailed(NO_API_KEY)
        key = parts[1].decode("latin-1")
        token, config = None, config_snapshot()
        if key.startswith("sk-") and len(key) >= MIN_KEY_LENGTH:
            token = next((t for t in config.tokens_with_prefix(key_prefix(key)) if t.matches(key)), None)
        if token is None:
            raise AuthenticationFailed(f"Incorrect API key provided: {_mask(key)}.")
        if not token.enabled:
            raise AuthenticationFailed("This API key has been disabled.")
        if token.is_expired():
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


class HasApiToken(BasePermission):
    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.auth, ApiAccess)
