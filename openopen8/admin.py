"""Admin pieces shared by the gateway's and the channels' consoles."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _


class EnableDisableAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A model admin with ``enable``/``disable`` bulk actions, for a model with an ``enabled`` field."""

    actions = ["enable", "disable"]
    # Other fields reset when an operator enables rows again.
    reset_on_enable: dict[str, Any] = {}

    def _set_enabled(self, request: HttpRequest, queryset: QuerySet[Any], enabled: bool) -> None:
        changes = {"enabled": enabled, **(self.reset_on_enable if enabled else {})}
        rows = list(queryset)
        with transaction.atomic():
            # Row by row, not one UPDATE: each change is saved, so the history records it (gateway/audit.py).
            for row in rows:
                for field, value in changes.items():
                    setattr(row, field, value)
                row.save(update_fields=list(changes))  # each save tells every process (gateway/cache.py)
        meta = queryset.model._meta
        noun = meta.verbose_name if len(rows) == 1 else meta.verbose_name_plural
        done = gettext("%(count)d %(noun)s enabled.") if enabled else gettext("%(count)d %(noun)s disabled.")
        self.message_user(request, done % {"count": len(rows), "noun": noun})

    @admin.action(description=_("Enable selected %(verbose_name_plural)s"))
    def enable(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description=_("Disable selected %(verbose_name_plural)s"))
    def disable(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._set_enabled(request, queryset, False)
