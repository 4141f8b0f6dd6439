from __future__ import annotations

from django.apps import AppConfig


class ChannelsConfig(AppConfig):
    # Named explicitly: the PyPI package "channels" (Django Channels) also installs a top-level module called
    # "channels". That package must never be added to requirements.txt.
    name = "channels"
    label = "channels"
    verbose_name = "Upstream channels"
    default_auto_field = "django.db.models.BigAutoField"
