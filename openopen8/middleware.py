"""The console's session, language, user, messages and login-lockout middleware, skipped for API calls.

A ``/v1/`` call authenticates with its Bearer token and uses no session, no Django user and no messages, yet the three
middleware built a session store, a lazy user and a message store (with its signer) for every call
(bench/RESULTS.md). These subclasses keep Django's, and the admin's checks that they are
installed, for every other path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from auditlog.middleware import AuditlogMiddleware
from axes.middleware import AxesMiddleware
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponseBase
from django.middleware.locale import LocaleMiddleware
from django.utils import translation

API_PREFIX = "/v1/"


class _ConsoleOnly:
    get_response: Callable[[HttpRequest], Any]

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path_info.startswith(API_PREFIX):
            return self.get_response(request)  # type: ignore[no-any-return]
        return super().__call__(request)  # type: ignore[misc,no-any-return]


class ConsoleSessionMiddleware(_ConsoleOnly, SessionMiddleware):
    pass


class ConsoleAuthenticationMiddleware(_ConsoleOnly, AuthenticationMiddleware):
    pass


class ConsoleMessageMiddleware(_ConsoleOnly, MessageMiddleware):
    pass


class ConsoleAxesMiddleware(_ConsoleOnly, AxesMiddleware):  # type: ignore[misc]
    """django-axes' login lockout answer; API calls have no login."""


class ConsoleAuditlogMiddleware(_ConsoleOnly, AuditlogMiddleware):  # type: ignore[misc]
    """The operator behind each change in the history; API calls change nothing an operator set."""


class ConsoleLocaleMiddleware(_ConsoleOnly, LocaleMiddleware):
    """The console in the browser's language (English or Chinese); the client API stays in OpenAI's English, so the
    language is dropped again after each console request (a gthread worker's thread serves API calls next)."""

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        try:
            return super().__call__(request)
        finally:
            if not request.path_info.startswith(API_PREFIX):
                translation.deactivate()
