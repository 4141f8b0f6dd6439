"""Channel writes that the request path and the admin share: setting a rejected key aside."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from channels.adapters.base import ChannelTarget
from channels.models import Channel, key_fingerprint


def channel_key_reject(channel_id: int, *, key: str, reason: str) -> ChannelTarget | None:
    """Set a key the provider rejected aside, until an operator restores it; disable the channel, with the reason,
    when no usable key is left. Returns the channel with another usable key, or ``None``."""
    with transaction.atomic():
        channel = Channel.objects.select_for_update().get(pk=channel_id)
        if key:
            channel.disabled_keys[key_fingerprint(key)] = {"reason": reason[:300], "at": timezone.now().isoformat()}
        if not channel.usable_keys():
            channel.enabled = False
            channel.disabled_reason = f"The provider rejected {'every key' if key else 'the request'}: {reason[:300]}"
        channel.save(update_fields=["disabled_keys", "enabled", "disabled_reason"])
    return channel.to_target() if channel.enabled else None
