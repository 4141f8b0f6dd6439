from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = _("Gateway")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Every change to tokens, groups, channels or prices reaches every process's cache (gateway/cache.py).
        from django.db.models.signals import post_delete, post_save

        from channels.models import Channel
        from channels.services import channel_disabled
        from gateway.alerts import on_channel_disabled
        from gateway.audit import audit_register
        from gateway.cache import config_changed
        from gateway.models import ApiToken, Price, TokenGroup

        for model in (ApiToken, Channel, Price, TokenGroup):
            post_save.connect(config_changed, sender=model, dispatch_uid=f"config-changed-save-{model.__name__}")
            post_delete.connect(config_changed, sender=model, dispatch_uid=f"config-changed-delete-{model.__name__}")
        audit_register()
        channel_disabled.connect(on_channel_disabled, dispatch_uid="alert-channel-disabled")
