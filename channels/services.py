"""Channel operations outside a client request's translation: recording an attempt's outcome on the channel,
setting a rejected key aside, testing a channel."""

from __future__ import annotations

import threading
import time

from django.db import connections, transaction
from django.dispatch import Signal
from django.utils import timezone

from channels import adapters
from channels.adapters.base import ChannelTarget
from channels.models import Channel, key_fingerprint
from openopen8.core.errors import GatewayError, mask_error, mask_secrets
from openopen8.core.rules import check_request, rule_for

# When this process last wrote each channel's last-used columns: a busy channel is written once a second, not on
# every request (the row would be a lock every request waits on).
_last_written: dict[int, float] = {}
WRITE_EVERY_S = 1.0

# Sent (with ``channel_id``) once the gateway itself has disabled a channel, after the change is committed.
channel_disabled = Signal()


def channel_attempt_record(channel_id: int, *, latency_ms: int, error: str | None = None) -> None:
    """Update the channel's last-used, latency and last-error columns after an attempt (``error``: its message);
    successes at most once a second per process."""
    now = timezone.now()
    if error is None:
        if time.monotonic() - _last_written.get(channel_id, -WRITE_EVERY_S) >= WRITE_EVERY_S:
            _last_written[channel_id] = time.monotonic()
            Channel.objects.filter(pk=channel_id).update(last_used_at=now, last_latency_ms=latency_ms, last_error="")
        return
    _last_written.pop(channel_id, None)  # the next success clears the error at once
    Channel.objects.filter(pk=channel_id).update(last_used_at=now, last_latency_ms=latency_ms,
                                                 last_error=error[:500], last_error_at=now)


def attempt_marks_reset() -> None:
    """Forget when channels were last written (tests: ids repeat once a test's rows are rolled back)."""
    _last_written.clear()


def channel_key_reject(channel_id: int, *, key: str, reason: str) -> ChannelTarget | None:
    """Set a key the provider rejected aside, until an operator restores it; disable the channel, with the reason,
    when no usable key is left. Returns the channel with another usable key, or ``None``."""
    with transaction.atomic():
        channel = Channel.objects.select_for_update().get(pk=channel_id)
        if key:
            channel.disabled_keys[key_fingerprint(key)] = {"reason": reason[:300], "at": timezone.now().isoformat()}
        if not channel.usable_keys() and channel.enabled:
            channel.enabled = False
            channel.disabled_reason = f"The provider rejected {'every key' if key else 'the request'}: {reason[:300]}"
            transaction.on_commit(lambda: channel_disabled.send(Channel, channel_id=channel_id))
        channel.save(update_fields=["disabled_keys", "enabled", "disabled_reason"])
    return channel.to_target() if channel.enabled else None


def channel_key_works(target: ChannelTarget) -> bool | None:
    """Whether the provider takes the target's key, asked with the adapter's cheap probe (no image made): ``False``
    when the probe is refused with 401/403 too, ``True`` when it is answered, ``None`` when there is no probe or
    it could not tell (the provider down, a timeout)."""
    adapter = adapters.get_adapter(target.kind)
    probe = adapter.build_probe(target)
    if probe is None:
        return None
    try:
        resp = adapter.transport(probe, timeout=min(target.timeout or 10.0, 10.0),
                                 connect_timeout=target.connect_timeout)
    except GatewayError:
        return None
    if resp.status in (401, 403):
        return False
    return True if resp.status < 400 else None


TEST_PROMPT = "A small red circle on a white background."


def _smallest_size(model: str) -> str | None:
    rule = rule_for(model)
    sizes = [s for s in (rule or {}).get("sizes", []) if "x" in s]
    return min(sizes, key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1])) if sizes else None


def channel_test(channel: Channel, *, real: bool = False) -> tuple[bool, str]:
    """Probe a channel, each of its keys in turn: a cheap request (the provider's model list, no image), or with
    ``real`` one smallest-size image. Records the result and latency on the channel; returns (ok, message)."""
    started = time.monotonic()
    adapter, results, ok = adapters.get_adapter(channel.kind), [], True
    keys = channel.keys() or [""]
    model = next((m for m in [*channel.model_names(), *channel.model_map] if m != "*"), None)
    for key in keys:
        target = channel.to_target(key=key)
        assert target is not None
        label = f"key …{key[-4:]}" if len(key) > 8 else "no key" if not key else "key"
        try:
            if real:
                if model is None:
                    raise GatewayError("name a model in the channel's models to test a generation")
                fields = {"model": model, "prompt": TEST_PROMPT, "n": 1, "response_format": "b64_json"}
                size = _smallest_size(model)
                if size:
                    fields["size"] = size
                result, latency = adapters.call(target, check_request(fields, endpoint="generations"),
                                                timeout=target.timeout or 120)
                results.append(f"{label}: {len(result.data)} image(s) from {model} in {latency} ms")
            else:
                probe = adapter.build_probe(target)
                if probe is None:
                    results.append(f"{label}: nothing to probe (no provider)")
                    continue
                resp = adapter.transport(probe, timeout=target.timeout or 30, connect_timeout=target.connect_timeout)
                if resp.status >= 400:
                    raise mask_error(adapter.parse_error(resp, target), *probe.secrets(), key)
                results.append(f"{label}: answered in {resp.latency_ms} ms")
        except GatewayError as error:
            ok = False
            results.append(f"{label}: {mask_secrets(error.message, key)}")
    message = "; ".join(results)
    latency_ms = int((time.monotonic() - started) * 1000)
    passed = {"last_error": "", "last_error_at": None} if ok else {}  # a channel that works is not "failing"
    Channel.objects.filter(pk=channel.pk).update(last_test_at=timezone.now(), last_test_ok=ok,
                                                 last_test_message=message[:2000], last_test_latency_ms=latency_ms,
                                                 **passed)
    return ok, message


def channels_test(channels: list[Channel], *, real: bool = False, within: float = 60.0) -> list[tuple[bool, str]]:
    """``channel_test`` of several channels at once, for at most ``within`` seconds in all: a channel still being
    tested then is reported as such (its test goes on, and records its result when it ends)."""
    results: list[tuple[bool, str] | None] = [None] * len(channels)

    def one(index: int) -> None:
        try:
            results[index] = channel_test(channels[index], real=real)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(channels))]
    for thread in threads:
        thread.start()
    until = time.monotonic() + within
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    return [r if r is not None else (False, f"still testing after {within:g} s; see its last test later")
            for r in results]

