from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ChannelsConfig(AppConfig):
    # Named explicitly: the PyPI package "channels" (Django Channels) also installs a top-level module called
    # "channels". That package must never be added to requirements.txt.
    name = "channels"
    label = "channels"
    verbose_name = _("Upstream channels")
    default_auto_field = "django.db.models.BigAutoField"
