"""The operator console for upstream channels: keys masked, config checked on save, enable/disable actions."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.utils.html import format_html

from channels.models import ENDPOINTS, Channel, split_names
from openopen8.admin import EnableDisableAdmin


class ChannelForm(forms.ModelForm):
    api_key = forms.CharField(label="API keys", required=False, strip=True,
                              widget=forms.Textarea(attrs={"rows": 2, "autocomplete": "off", "spellcheck": "false"}),
                              help_text="One per line, used in turn.")
    endpoints = forms.MultipleChoiceField(choices=[(e, e) for e in ENDPOINTS], widget=forms.CheckboxSelectMultiple,
                                          initial=list(ENDPOINTS), help_text="What this channel serves.")

    class Meta:
        model = Channel
        fields = ["name", "kind", "base_url", "api_key", "served_models", "model_map", "endpoints", "priority",
                  "weight", "enabled", "timeout", "config"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["endpoints"] = split_names(self.instance.endpoints)
        self.initial["api_key"] = ""  # stored keys never go back to the browser
        if self.instance.pk and self.instance.api_key:
            self.fields["api_key"].help_text = (f"Set: {self.instance.masked_key}. Leave empty to keep them; enter "
                                                "new keys, one per line, to replace them all.")

    def clean_endpoints(self) -> str:
        return ",".join(self.cleaned_data["endpoints"])

    def clean_api_key(self) -> str:
        # The stored key is never sent to the browser, so an empty field means "keep the current one".
        return self.cleaned_data["api_key"] or (self.instance.api_key if self.instance.pk else "")


@admin.register(Channel)
class ChannelAdmin(EnableDisableAdmin):
    form = ChannelForm
    list_display = ["name", "kind", "served_models", "endpoints", "priority", "weight", "enabled", "key", "status",
                    "last_used_at", "last_latency_ms"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "served_models", "base_url"]
    readonly_fields = ["last_error", "last_error_at", "last_used_at", "last_latency_ms", "created_at"]

    @admin.display(description="API key")
    def key(self, channel: Channel) -> str:
        return channel.masked_key

    @admin.display(description="status")
    def status(self, channel: Channel) -> str:
        if not channel.enabled:
            return format_html('<span style="color:#888">disabled</span>')
        if channel.last_error:
            return format_html('<span style="color:#ba2121" title="{}">failing: {}</span>', channel.last_error,
                               channel.last_error[:60])
        return format_html('<span style="color:#2a7d2a">{}</span>', "ok" if channel.last_used_at else "unused")

