"""The operator console for upstream channels: keys masked, config checked on save, enable/disable actions."""

from __future__ import annotations

import threading
import time
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from channels.adapters import KIND_CHOICES, get_adapter
from channels.models import ENDPOINTS, Channel, split_names
from channels.services import channels_test
from gateway.state import CircuitView, shared_state
from openopen8.admin import EnableDisableAdmin

_page = threading.local()
TEST_WITHIN_S = 30.0  # the page waits this long for the tests it started, whatever their number


def kind_help() -> str:
    """What each channel type serves and which config keys it reads, one block a type; the form's script shows the
    chosen type's."""
    blocks = []
    for kind, label in KIND_CHOICES:
        adapter = get_adapter(kind)
        served = [e for e in ENDPOINTS if e in adapter.endpoints]
        files = ", ".join(sorted(adapter.file_fields)) if adapter.max_input_images else gettext("none")
        text = gettext("serves %(endpoints)s; up to %(images)d input image(s); files: %(files)s; config keys: "
                       "%(keys)s (see the README's channel types).") % {
            "endpoints": ", ".join(served), "images": adapter.max_input_images, "files": files,
            "keys": ", ".join(sorted(adapter.config_keys)) or gettext("none (leave the config {})")}
        blocks.append((kind, ",".join(served), label, text))
    return format_html_join(
        "", '<div class="oo8-kind-help" data-kind="{}" data-endpoints="{}"><strong>{}</strong>: {}</div>', blocks)


class ChannelForm(forms.ModelForm):
    kind = forms.ChoiceField(label=_("Type"), choices=KIND_CHOICES)
    api_key = forms.CharField(label=_("API keys"), required=False, strip=True,
                              widget=forms.Textarea(attrs={"rows": 2, "autocomplete": "off", "spellcheck": "false"}),
                              help_text=_("One per line, used in turn."))
    endpoints = forms.MultipleChoiceField(choices=[(e, e) for e in ENDPOINTS], widget=forms.CheckboxSelectMultiple,
                                          initial=list(ENDPOINTS), help_text=_("What this channel serves."))

    class Meta:
        model = Channel
        fields = ["name", "kind", "base_url", "api_key", "served_models", "model_map", "endpoints", "priority",
                  "weight", "enabled", "timeout", "connect_timeout", "safe_to_retry", "images_per_minute",
                  "max_in_flight", "end_user", "config", "demo"]

    class Media:
        js = ("channels/channel_form.js",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["kind"].help_text = kind_help()
        if self.instance.pk:
            self.initial["endpoints"] = split_names(self.instance.endpoints)
        self.initial["api_key"] = ""  # stored keys never go back to the browser
        if self.instance.pk and self.instance.api_key:
            self.fields["api_key"].help_text = gettext(
                "Set: %(keys)s. Leave empty to keep them; enter new keys, one per line, to replace them all."
            ) % {"keys": self.instance.masked_key}

    def clean_endpoints(self) -> str:
        return ",".join(self.cleaned_data["endpoints"])

    def clean_api_key(self) -> str:
        # The stored key is never sent to the browser, so an empty field means "keep the current one".
        return self.cleaned_data["api_key"] or (self.instance.api_key if self.instance.pk else "")


class KindFilter(admin.SimpleListFilter):
    title = _("type")
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return KIND_CHOICES

    def queryset(self, request: HttpRequest, queryset: QuerySet[Channel]) -> QuerySet[Channel]:
        return queryset.filter(kind=self.value()) if self.value() else queryset


@admin.register(Channel)
class ChannelAdmin(EnableDisableAdmin):
    form = ChannelForm
    # Health first: on a 1440 px screen status, circuit and last test show without scrolling.
    list_display = ["name", "type", "status", "circuit_state", "last_test", "enabled", "served_models", "priority",
                    "weight", "key", "endpoints", "last_used_at", "last_latency_ms"]
    list_filter = [KindFilter, "enabled"]
    search_fields = ["name", "served_models", "base_url"]
    readonly_fields = ["disabled_reason", "set_aside_keys", "last_error", "last_error_at", "last_used_at",
                       "last_latency_ms", "last_test_at", "last_test_ok", "last_test_message", "last_test_latency_ms",
                       "created_at"]
    actions = ["enable", "disable", "test_probe", "test_generation"]
    reset_on_enable = {"disabled_keys": {}, "disabled_reason": ""}

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        # One read of the shared state for the whole page, not one per row; per thread, as the admin is shared.
        _page.circuits = shared_state().circuits(list(Channel.objects.values_list("pk", flat=True)))
        _page.now = time.time()
        return super().changelist_view(request, extra_context)

    @admin.display(description=_("type"), ordering="kind")
    def type(self, channel: Channel) -> str:
        if channel.demo:
            return format_html('{} <strong title="{}">{}</strong>', channel.kind_label,
                               gettext("Serves only keys without a budget; delete it once real channels are set up."),
                               gettext("DEMO"))
        return channel.kind_label

    # Not named "circuit": the admin would show the Channel.circuit relation (the database's circuit row) instead.
    @admin.display(description=_("circuit"))
    def circuit_state(self, channel: Channel) -> str:
        now = getattr(_page, "now", time.time())
        view = getattr(_page, "circuits", {}).get(channel.pk, CircuitView())
        state = view.state(now)
        if state == "closed":
            return gettext("closed") if not view.failures else ngettext(
                "closed (%(n)d recent fault)", "closed (%(n)d recent faults)", view.failures) % {"n": view.failures}
        if state == "open":
            return format_html('<span style="color:#ba2121">{}</span>', gettext("open for %(s)d s more") % {
                "s": int((view.open_until or 0) - now)})
        return format_html('<span style="color:#b07a00">{}</span>', gettext("half-open: next request probes"))

    @admin.display(description=_("set-aside keys"))
    def set_aside_keys(self, channel: Channel) -> str:
        keys = "; ".join(f"{fp[:8]}: {v.get('reason', '')}" for fp, v in channel.disabled_keys.items())
        return keys or gettext("none")

    @admin.display(description=_("last test"))
    def last_test(self, channel: Channel) -> str:
        if channel.last_test_at is None:
            return gettext("never")
        color = "#2a7d2a" if channel.last_test_ok else "#ba2121"
        return format_html('<span style="color:{}" title="{}">{} ({} ms)</span>', color, channel.last_test_message,
                           gettext("ok") if channel.last_test_ok else gettext("failed"), channel.last_test_latency_ms)

    def _test(self, request: HttpRequest, queryset: QuerySet[Channel], *, real: bool) -> None:
        channels = list(queryset)
        for channel, (ok, message) in zip(channels, channels_test(channels, real=real, within=TEST_WITHIN_S),
                                          strict=True):
            self.message_user(request, f"{channel.name}: {gettext('ok') if ok else gettext('FAILED')}: {message}",
                              messages.SUCCESS if ok else messages.ERROR)

    @admin.action(description=_("Test selected channels (cheap probe, no image)"))
    def test_probe(self, request: HttpRequest, queryset: QuerySet[Channel]) -> None:
        self._test(request, queryset, real=False)

    @admin.action(description=_("Test selected channels with one real smallest-size image (the provider bills it)"))
    def test_generation(self, request: HttpRequest, queryset: QuerySet[Channel]) -> None:
        self._test(request, queryset, real=True)

    @admin.display(description=_("API key"))
    def key(self, channel: Channel) -> str:
        return channel.masked_key

    @admin.display(description=_("status"))
    def status(self, channel: Channel) -> str:
        if not channel.enabled:
            return format_html('<span style="color:#888" title="{}">{}{}</span>', channel.disabled_reason,
                               gettext("disabled"), ": " + channel.disabled_reason[:60] if channel.disabled_reason
                               else "")
        if channel.last_error:
            return format_html('<span style="color:#ba2121" title="{}">{}: {}</span>', channel.last_error,
                               gettext("failing"), channel.last_error[:60])
        return format_html('<span style="color:#2a7d2a">{}</span>',
                           gettext("ok") if channel.last_used_at else gettext("unused"))

