"""The operator console for tokens, prices and usage."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from datetime import UTC
from decimal import Decimal
from typing import Any, cast

from django import forms
from django.contrib import admin
from django.db.models import QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from channels.models import Channel, split_names
from gateway.models import (
    Alert,
    ApiToken,
    Budgeted,
    FailedAuthentication,
    ImageJob,
    Price,
    TokenGroup,
    UsageLog,
    WebhookDelivery,
    from_micros,
    to_micros,
)
from gateway.selectors import ledger_micros
from gateway.services import job_cancel, token_create
from gateway.tasks import webhook_enqueue
from gateway.webhooks import webhook_secret_rotate
from openopen8.admin import EnableDisableAdmin
from openopen8.core.crypto import decrypt, encrypt
from openopen8.core.rules import rule_for

NEW_KEY = "openopen8-new-key:"  # the session entry that holds a new key until its page has shown it


class BudgetForm(forms.ModelForm):
    """A budget typed in USD, kept in micro-dollars."""

    budget = forms.DecimalField(label=_("Budget (USD)"), required=False, min_value=Decimal(0), decimal_places=6,
                                help_text=_("Empty means unlimited; a renewing budget is this much each period."))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.budget_micros is not None:
            self.initial["budget"] = from_micros(self.instance.budget_micros)

    def save(self, commit: bool = True) -> Any:
        budget = self.cleaned_data.get("budget")
        self.instance.budget_micros = None if budget is None else to_micros(budget)
        return super().save(commit=commit)


class ApiTokenForm(BudgetForm):
    class Meta:
        model = ApiToken
        fields = ["name", "enabled", "expires_at", "budget", "budget_period", "group", "allowed_models",
                  "requests_per_minute", "max_in_flight", "max_queued_jobs"]

    def clean_allowed_models(self) -> str:
        """Each allowed model is one a channel serves or the gateway knows, so a typo is not a silent refusal."""
        names = split_names(self.cleaned_data["allowed_models"])
        channels = list(Channel.objects.all())
        unknown = [n for n in names if rule_for(n) is None and not any(c.serves(n) for c in channels)]
        if unknown:
            raise forms.ValidationError(gettext("No channel serves %(models)s, and it is no model the gateway knows: "
                                                "check the spelling.") % {"models": ", ".join(unknown)})
        return ",".join(names)

    def clean_expires_at(self) -> Any:
        expires = self.cleaned_data["expires_at"]
        if expires is not None and expires <= timezone.now() and "expires_at" in self.changed_data:
            raise forms.ValidationError(gettext("That moment has passed: the key would never work. Disable it "
                                                "instead."))
        return expires

    def save(self, commit: bool = True) -> ApiToken:
        if self.cleaned_data.get("budget") is not None and self.instance.budget_micros is None and self.instance.pk:
            # A one-off budget given to a token that had none counts what it already spent (its usage rows).
            self.instance.spent_micros = ledger_micros(self.instance.pk) if not self.instance.budget_period else 0
        token: ApiToken = super().save(commit=commit)
        return token


class TokenGroupForm(BudgetForm):
    class Meta:
        model = TokenGroup
        fields = ["name", "budget", "budget_period", "multiplier"]


def budget_columns(budgeted: Budgeted, ledger: int) -> tuple[str, str, str]:
    """Budget, spent and left (in the running period), for the console's lists."""
    if budgeted.budget_micros is None:
        return gettext("unlimited"), f"{from_micros(ledger):.4f}", "–"
    spent = budgeted.spent_this_period()
    period = f" / {budgeted.get_budget_period_display()}" if budgeted.budget_period else ""
    return (f"{from_micros(budgeted.budget_micros):.4f}{period}", f"{from_micros(spent):.4f}",
            f"{from_micros(max(0, budgeted.budget_micros - spent)):.4f}")


class BudgetColumns(admin.ModelAdmin):
    """The list columns of a budget: what it is, what was spent and is left in the running period, when it renews.
    Without a budget, spent is the sum of the usage rows."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        rows = super().get_queryset(request).annotate(ledger=Coalesce(Sum("usage__cost_micros"), 0))
        return cast("QuerySet[Any]", rows)

    @admin.display(description=_("budget (USD)"))
    def budget_usd(self, budgeted: Budgeted) -> str:
        return budget_columns(budgeted, getattr(budgeted, "ledger", 0))[0]

    @admin.display(description=_("spent (USD)"))
    def spent_usd(self, budgeted: Budgeted) -> str:
        return budget_columns(budgeted, getattr(budgeted, "ledger", 0))[1]

    @admin.display(description=_("left (USD)"))
    def left_usd(self, budgeted: Budgeted) -> str:
        return budget_columns(budgeted, 0)[2]

    @admin.display(description=_("renews"))
    def period_ends(self, budgeted: Budgeted) -> Any:
        return budgeted.period_ends() or "–"


@admin.register(ApiToken)
class ApiTokenAdmin(BudgetColumns, EnableDisableAdmin):
    form = ApiTokenForm
    list_display = ["name", "key_display", "enabled", "group", "budget_usd", "spent_usd", "left_usd", "period_ends",
                    "allowed_models", "requests_per_minute", "max_in_flight", "expires_at", "last_used_at",
                    "created_at"]
    list_filter = ["enabled", "group", "budget_period"]
    list_select_related = ("group",)
    search_fields = ["name", "key_prefix"]
    readonly_fields = ["key_display", "spent_usd", "left_usd", "period_ends", "created_at", "last_used_at",
                       "webhook_secret_display"]
    actions = [*EnableDisableAdmin.actions, "rotate_webhook_secret"]

    def has_delete_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        # A token that was used stays, so its usage rows keep naming it: disable it instead.
        if obj is not None and UsageLog.objects.filter(token=obj).exists():
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would delete used tokens too; "disable" is the bulk action
        return actions

    @admin.display(description=_("key"))
    def key_display(self, token: ApiToken) -> str:
        return f"sk-{token.key_prefix}…" if token.key_prefix else gettext("(shown once, on creation)")

    @admin.display(description=_("webhook signing secret"))
    def webhook_secret_display(self, token: ApiToken) -> str:
        # The key's owner verifies its job webhooks with it (Standard Webhooks); it signs, it does not authenticate.
        return str(token.webhook_secret) or gettext("(made when the key first sends a callback_url)")

    @admin.action(description=_("Rotate the webhook signing secret of selected tokens"))
    def rotate_webhook_secret(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        for token in queryset:
            webhook_secret_rotate(token)
        count = queryset.count()
        self.message_user(request, ngettext("A new webhook signing secret for %(count)d token; its webhooks from now "
                                            "on are signed with it.",
                                            "New webhook signing secrets for %(count)d tokens; their webhooks from "
                                            "now on are signed with them.", count) % {"count": count})

    def save_model(self, request: HttpRequest, obj: ApiToken, form: forms.ModelForm, change: bool) -> None:
        if change:
            obj.save()
            return
        _token, request._openopen8_new_key = token_create(name=obj.name, token=obj)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None) -> HttpResponse:
        # Redirect after the POST, so a reload cannot create a second key: the key waits in the operator's session,
        # encrypted, for the one page that shows it and forgets it.
        request.session[f"{NEW_KEY}{obj.pk}"] = encrypt(request._openopen8_new_key)  # type: ignore[attr-defined]
        return HttpResponseRedirect(reverse("admin:gateway_apitoken_key", args=[obj.pk]))

    def get_urls(self) -> list[Any]:
        return [path("<int:token_id>/key/", self.admin_site.admin_view(self.key_view), name="gateway_apitoken_key"),
                *super().get_urls()]

    def key_view(self, request: HttpRequest, token_id: int) -> HttpResponse:
        """The new key, once: read from the session and gone from it."""
        token = get_object_or_404(ApiToken, pk=token_id)
        stored = request.session.pop(f"{NEW_KEY}{token_id}", None)
        context = {**self.admin_site.each_context(request), "token": token, "opts": self.model._meta,
                   "key": decrypt(stored) if stored else None, "title": gettext("API key created"),
                   "base_url": request.build_absolute_uri("/v1")}
        return TemplateResponse(request, "admin/gateway/apitoken/key_created.html", context)


@admin.register(TokenGroup)
class TokenGroupAdmin(BudgetColumns):
    form = TokenGroupForm
    list_display = ["name", "budget_usd", "spent_usd", "left_usd", "period_ends", "multiplier", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["spent_usd", "left_usd", "period_ends"]


SIZE = re.compile(r"\d+x\d+|auto")


class PriceForm(forms.ModelForm):
    """Amounts of zero or more, and a size written as requests write it (1024x1024), so the row can match."""

    class Meta:
        model = Price
        fields = "__all__"

    def clean_size(self) -> str:
        size = str(self.cleaned_data["size"]).strip().lower()
        if size and not SIZE.fullmatch(size):
            raise forms.ValidationError(gettext("A size is WIDTHxHEIGHT (1024x1024), auto, or empty for any size."))
        return size

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name, value in list(cleaned.items()):
            if isinstance(value, Decimal) and value < 0:
                self.add_error(name, gettext("A price cannot be below zero."))
        return cleaned


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    form = PriceForm
    list_display = ["model", "size", "quality", "usd_per_image", "usd_per_1m_text_input", "usd_per_1m_image_input",
                    "usd_per_1m_cached_input", "usd_per_1m_image_output", "usd_per_1m_text_output",
                    "ceiling_usd_per_image", "effective_from"]
    list_filter = ["model"]
    search_fields = ["model"]


# The usage export's columns: (heading, field). Money is in USD, times in UTC (ISO 8601).
EXPORT_COLUMNS = [("created_at (UTC)", "created_at"), ("request_id", "request_id"), ("token", "token__name"),
                  ("group", "group__name"), ("endpoint", "endpoint"), ("model", "model"), ("channel", "channel__name"),
                  ("provider_model", "provider_model"), ("status", "status"), ("http_status", "http_status"),
                  ("error_code", "error_code"), ("n", "n"), ("images_returned", "images_returned"),
                  ("size", "size"), ("quality", "quality"), ("cost_usd", "cost_micros"),
                  ("hold_usd", "hold_micros"), ("input_text_tokens", "input_text_tokens"),
                  ("input_image_tokens", "input_image_tokens"), ("output_image_tokens", "output_image_tokens"),
                  ("latency_ms", "latency_ms"), ("client_gone", "client_gone"), ("replay_of", "replay_of"),
                  ("job", "job_id")]


class _Echo:
    """What csv.writer writes to: each line handed back, for streaming."""

    def write(self, value: str) -> str:
        return value


def _exported(field: str, value: Any) -> Any:
    if value is None:
        return ""
    if field.endswith("_micros"):
        return f"{from_micros(value):.6f}"
    if field == "created_at":
        return value.astimezone(UTC).isoformat()
    return value


@admin.register(UsageLog)
class UsageLogAdmin(admin.ModelAdmin):
    # What an operator looks for first comes first: a 1440 px screen shows status and cost without scrolling.
    list_display = ["created_at", "status", "http_status", "error_code", "cost_usd", "model", "token", "channel",
                    "images_returned", "latency_ms", "endpoint", "n", "size", "quality", "hold_usd",
                    "output_image_tokens", "request_id"]
    list_filter = ["status", "http_status", "error_code", "endpoint", "model", "token", "group", "channel",
                   "client_gone", ("created_at", admin.DateFieldListFilter)]
    # Money in USD on the row's page as in the list; the channels tried as a table.
    exclude = ["cost_micros", "reserved_micros", "hold_micros", "overrun_micros", "attempts"]
    readonly_fields = ["cost_usd", "hold_usd", "reserved_usd", "attempts_table"]

    def get_urls(self) -> list[Any]:
        return [path("export/", self.admin_site.admin_view(self.export_csv), name="gateway_usagelog_export"),
                *super().get_urls()]

    def export_csv(self, request: HttpRequest) -> StreamingHttpResponse:
        """The rows the list shows with the same filters, as CSV streamed row by row: a million rows are read in
        chunks from the database and never held at once."""
        rows = self.get_changelist_instance(request).get_queryset(request).order_by("-created_at", "-pk")
        values = rows.values_list(*(field for _, field in EXPORT_COLUMNS)).iterator(chunk_size=2000)
        writer = csv.writer(_Echo())

        def lines() -> Iterator[str]:
            yield writer.writerow([title for title, _ in EXPORT_COLUMNS])
            for row in values:
                yield writer.writerow([_exported(field, value) for (_, field), value in zip(EXPORT_COLUMNS, row,
                                                                                              strict=True)])

        response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="usage-{timezone.now():%Y%m%d-%H%M%S}.csv"'
        return response

    @admin.display(description=_("still held (USD)"))
    def reserved_usd(self, log: UsageLog) -> str:
        return f"{from_micros(log.reserved_micros):.4f}"

    @admin.display(description=_("channels tried"))
    def attempts_table(self, log: UsageLog) -> str:
        if not log.attempts:
            return gettext("none")
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((a.get("name", ""), a.get("outcome", ""), a.get("status") or "", a.get("code") or "",
              a.get("latency_ms", ""), a.get("message") or "") for a in log.attempts))
        heads = format_html_join("", "<th>{}</th>", ((h,) for h in (
            gettext("channel"), gettext("outcome"), gettext("status"), gettext("code"), gettext("latency (ms)"),
            gettext("message"))))
        return format_html("<table><tr>{}</tr>{}</table>", heads, rows)
    list_select_related = ("token", "channel")
    search_fields = ["request_id", "replay_of", "model", "error_message"]
    date_hierarchy = "created_at"

    @admin.display(description=_("cost (USD)"))
    def cost_usd(self, log: UsageLog) -> str:
        if not log.overrun_micros:
            return f"{log.cost:.4f}"
        return f"{log.cost:.4f}" + gettext(" (%(usd).4f over the hold)") % {"usd": from_micros(log.overrun_micros)}

    @admin.display(description=_("held (USD)"))
    def hold_usd(self, log: UsageLog) -> str:
        return f"{from_micros(log.hold_micros):.4f}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False


DELIVERY_FIELDS = ("attempt", "at", "status_code", "error", "duration_ms", "delivered", "next_attempt_at")


class WebhookDeliveryInline(admin.TabularInline[WebhookDelivery, ImageJob]):
    model = WebhookDelivery
    extra = 0
    can_delete = False
    fields = DELIVERY_FIELDS
    readonly_fields = DELIVERY_FIELDS

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ImageJob)
class ImageJobAdmin(admin.ModelAdmin):
    """Image jobs: read-only but for cancelling (a queued job is refunded at once, a running one stops before its
    next provider call)."""

    list_display = ["id", "created_at", "token", "endpoint", "model", "status", "age", "runs", "error_status",
                    "webhook", "completed_at"]
    list_filter = ["status", "endpoint", "model", "token", ("created_at", admin.DateFieldListFilter)]
    list_select_related = ("token",)
    search_fields = ["id", "request_id", "model"]
    date_hierarchy = "created_at"
    actions = ["cancel", "redeliver"]
    exclude = ["body", "result"]  # prompts and megabytes of base64: the usage row says what an operator needs
    inlines = [WebhookDeliveryInline]

    @admin.display(description=_("webhook"))
    def webhook(self, job: ImageJob) -> str:
        if not job.callback_url:
            return "-"
        last = job.deliveries.order_by("-at").first()
        if last is None:
            return gettext("waiting")
        return gettext("delivered") if last.delivered else ngettext(
            "failed (%(n)d try)", "failed (%(n)d tries)", last.attempt) % {"n": last.attempt}

    @admin.action(description=_("Deliver the webhook of selected finished jobs again"))
    def redeliver(self, request: HttpRequest, queryset: QuerySet[ImageJob]) -> None:
        jobs = list(queryset.exclude(callback_url="").exclude(status__in=(ImageJob.Status.QUEUED,
                                                                          ImageJob.Status.RUNNING)))
        for job in jobs:
            webhook_enqueue(job.id)
        self.message_user(request, ngettext("The webhook of %(count)d job will be delivered again.",
                                            "The webhooks of %(count)d jobs will be delivered again.", len(jobs))
                          % {"count": len(jobs)})

    @admin.display(description=_("age"))
    def age(self, job: ImageJob) -> str:
        end = job.completed_at or timezone.now()
        return f"{(end - job.created_at).total_seconds():.0f} s"

    @admin.action(description=_("Cancel selected jobs (queued ones are refunded)"))
    def cancel(self, request: HttpRequest, queryset: QuerySet[ImageJob]) -> None:
        jobs = list(queryset.filter(status__in=(ImageJob.Status.QUEUED, ImageJob.Status.RUNNING)).select_related(
            "token"))
        for job in jobs:
            job_cancel(job.token, job.id)
        self.message_user(request, ngettext("Asked %(count)d job to stop; a queued one is cancelled and refunded.",
                                            "Asked %(count)d jobs to stop; queued ones were cancelled and refunded.",
                                            len(jobs)) % {"count": len(jobs)})

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ImageJob | None = None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the gateway writes: an operator reads them, never adds or edits one."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(FailedAuthentication)
class FailedAuthenticationAdmin(ReadOnlyAdmin):
    """Requests refused for their key, by how the key begins: a client with a stale key, or someone guessing."""

    list_display = ["key_start", "reason", "count", "token", "first_at", "last_at"]
    list_filter = ["reason", ("last_at", admin.DateFieldListFilter)]
    search_fields = ["key_start"]


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """What the operator was told (gateway/alerts.py), and whether the webhook and the mailbox got it."""

    list_display = ["created_at", "kind", "subject", "delivered_at", "emailed_at", "last_error"]
    list_filter = ["kind", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["subject", "text"]
    readonly_fields = ["kind", "created_at", "subject", "text", "data", "attempts", "webhook_status", "delivered_at",
                       "emailed_at", "last_error"]
