"""Which channels to try, in which order, and when to move on. Pure logic: no ORM, no HTTP, no settings."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from itertools import groupby

from channels.adapters import ChannelTarget
from openopen8.core.errors import GatewayError, RateLimited, UpstreamKeyRejected
from openopen8.core.schemas import ImageRequest


def weighted_order(targets: Sequence[ChannelTarget], rng: random.Random) -> list[ChannelTarget]:
    """All of ``targets`` in a random order where each next pick is drawn in proportion to its weight."""
    pool, order = list(targets), []
    while pool:
        pick = rng.choices(range(len(pool)), weights=[max(t.weight, 1) for t in pool])[0]
        order.append(pool.pop(pick))
    return order


def plan_attempts(candidates: Sequence[ChannelTarget], *, rng: random.Random, max_attempts: int) -> list[ChannelTarget]:
    """The channels to try, at most ``max_attempts``: highest priority first, weighted random within a priority."""
    by_priority = sorted(candidates, key=lambda t: -t.priority)
    plan: list[ChannelTarget] = []
    for _priority, tier in groupby(by_priority, key=lambda t: t.priority):
        plan.extend(weighted_order(list(tier), rng))
    return plan[:max_attempts]


def capable(targets: Sequence[ChannelTarget], *, endpoint: str, input_images: int,
            file_fields: set[str]) -> list[ChannelTarget]:
    """The channels that declare ``endpoint`` and whose adapter takes this many input images and these files."""
    return [t for t in targets if endpoint in t.endpoints and input_images <= t.max_input_images
            and file_fields <= t.file_fields]


def should_fail_over(error: GatewayError, *, attempts_left: int, safe_to_retry: bool = False) -> bool:
    """True when another channel may be tried: the fault was the channel's, not the request's, and the provider
    cannot have made a billable image; after an ambiguous fault (answer lost after sending) only when the channel
    is marked safe to retry."""
    if attempts_left <= 0:
        return False
    if error.ambiguous:
        return safe_to_retry
    return error.channel_fault


def counts_against_circuit(error: GatewayError) -> bool:
    """Faults that say the channel is broken: 5xx, timeouts, refused connections, malformed answers. Not the
    provider's rate limits, not a rejected key (handled on its own), not the client's faults."""
    return error.channel_fault and not isinstance(error, (RateLimited, UpstreamKeyRejected))


END_USER_FIELDS = ("user", "safety_identifier")


def with_end_user(req: ImageRequest, target: ChannelTarget, *, token_id: str) -> ImageRequest:
    """The request as this channel sends it: the client's end-user fields (the channel's ``client`` setting),
    ``token_id`` in their place (``token``; as ``user`` when the client sent neither), or neither (``none``)."""
    if target.end_user == "client":
        return req
    fields = {k: v for k, v in req.fields.items() if k not in END_USER_FIELDS}
    if target.end_user == "token":
        sent = [k for k in END_USER_FIELDS if k in req.fields] or ["user"]
        fields.update(dict.fromkeys(sent, token_id))
    return replace(req, fields=fields)
