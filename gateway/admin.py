"""The operator console for tokens, prices and usage."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from gateway.models import ApiToken, Price, UsageLog, from_micros, to_micros
from gateway.selectors import ledger_micros
from gateway.services import token_create
from openopen8.admin import EnableDisableAdmin


class ApiTokenForm(forms.ModelForm):
    budget = forms.DecimalField(label="Budget (USD)", required=False, min_value=Decimal(0), decimal_places=6,
                                help_text="Empty means unlimited.")

    class Meta:
        model = ApiToken
        fields = ["name", "enabled", "expires_at", "budget", "allowed_models", "requests_per_minute", "max_in_flight"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.budget_micros is not None:
            self.initial["budget"] = from_micros(self.instance.budget_micros)

    def save(self, commit: bool = True) -> ApiToken:
        budget = self.cleaned_data.get("budget")
        if budget is not None and self.instance.budget_micros is None and self.instance.pk:
            # A budget given to a token that had none counts what it already spent (its usage rows).
            self.instance.spent_micros = ledger_micros(self.instance.pk)
        self.instance.budget_micros = None if budget is None else to_micros(budget)
        token: ApiToken = super().save(commit=commit)
        return token


@admin.register(ApiToken)
class ApiTokenAdmin(EnableDisableAdmin):
    form = ApiTokenForm
    list_display = ["name", "key_display", "enabled", "budget_usd", "spent_usd", "allowed_models",
                    "requests_per_minute", "max_in_flight", "expires_at", "last_used_at", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "key_prefix"]
    readonly_fields = ["key_display", "spent_usd", "created_at", "last_used_at"]

    @admin.display(description="key")
    def key_display(self, token: ApiToken) -> str:
        return f"sk-{token.key_prefix}…" if token.key_prefix else "(shown once, on creation)"

    @admin.display(description="budget (USD)")
    def budget_usd(self, token: ApiToken) -> str:
        return "unlimited" if token.budget is None else f"{token.budget:.4f}"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        tokens: QuerySet[ApiToken] = super().get_queryset(request)
        return tokens.annotate(ledger=Coalesce(Sum("usage__cost_micros"), 0))

    @admin.display(description="spent (USD)")
    def spent_usd(self, token: ApiToken) -> str:
        spent = token.spent_micros if token.budget_micros is not None else getattr(token, "ledger", 0)
        return f"{from_micros(spent):.4f}"

    def save_model(self, request: HttpRequest, obj: ApiToken, form: forms.ModelForm, change: bool) -> None:
        if change:
            obj.save()
            return
        _token, request._openopen8_new_key = token_create(name=obj.name, token=obj)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None) -> HttpResponse:
        # The key exists only in this response: render it here rather than storing it in a message or session.
        context = {**self.admin_site.each_context(request), "token": obj, "key": request._openopen8_new_key,  # type: ignore[attr-defined]
                   "opts": self.model._meta, "title": "API key created",
                   "base_url": request.build_absolute_uri("/v1")}
        return TemplateResponse(request, "admin/gateway/apitoken/key_created.html", context)


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = ["model", "size", "quality", "usd_per_image"]
    list_editable = ["usd_per_image"]
    list_filter = ["model"]
    search_fields = ["model"]


@admin.register(UsageLog)
class UsageLogAdmin(admin.ModelAdmin):
    list_display = ["created_at", "request_id", "token", "endpoint", "model", "channel", "status", "http_status",
                    "n", "images_returned", "size", "quality", "cost_usd", "latency_ms", "error_code"]
    list_filter = ["status", "endpoint", "model", "token", "channel", "client_gone",
                   ("created_at", admin.DateFieldListFilter)]
    list_select_related = ("token", "channel")
    search_fields = ["request_id", "model", "error_message"]
    date_hierarchy = "created_at"

    @admin.display(description="cost (USD)")
    def cost_usd(self, log: UsageLog) -> str:
        return f"{log.cost:.4f}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False
