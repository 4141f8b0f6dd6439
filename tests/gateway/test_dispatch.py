from __future__ import annotations

import random
from collections import Counter

from channels.adapters.base import ChannelTarget
from gateway.dispatch import plan_attempts, should_fail_over, with_end_user
from openopen8.core.errors import ContentPolicyViolation, InvalidRequest, RateLimited, UpstreamError, UpstreamTimeout


def target(id: int, *, priority: int = 0, weight: int = 1) -> ChannelTarget:
    return ChannelTarget(id=id, name=f"c{id}", kind="openai", base_url="http://x", api_key="k", config=None,
                         priority=priority, weight=weight)


def test_higher_priority_channels_come_first() -> None:
    plan = plan_attempts([target(1, priority=0), target(2, priority=5), target(3, priority=1)],
                         rng=random.Random(1), max_attempts=10)
    assert [t.id for t in plan] == [2, 3, 1]


def test_weights_share_first_picks_within_a_priority() -> None:
    rng = random.Random(42)
    firsts = Counter(plan_attempts([target(1, weight=3), target(2, weight=1)], rng=rng, max_attempts=2)[0].id
                     for _ in range(4000))
    assert 0.70 < firsts[1] / 4000 < 0.80


def test_every_channel_of_a_tier_is_tried_before_a_lower_tier() -> None:
    plan = plan_attempts([target(1, priority=1), target(2, priority=1), target(3, priority=0)],
                         rng=random.Random(7), max_attempts=3)
    assert {plan[0].id, plan[1].id} == {1, 2} and plan[2].id == 3


def test_the_plan_is_cut_at_max_attempts() -> None:
    assert len(plan_attempts([target(i) for i in range(6)], rng=random.Random(0), max_attempts=2)) == 2


def test_channel_faults_fail_over_while_attempts_remain() -> None:
    for error in (UpstreamError("x", channel_fault=True), UpstreamTimeout("x", channel_fault=True),
                  RateLimited("x", channel_fault=True)):
        assert should_fail_over(error, attempts_left=1)
        assert not should_fail_over(error, attempts_left=0)


def test_the_clients_faults_never_fail_over() -> None:
    assert not should_fail_over(ContentPolicyViolation("no"), attempts_left=3)
    assert not should_fail_over(InvalidRequest("bad seed", param="seed"), attempts_left=3)


def test_a_channel_sends_the_clients_end_user_the_tokens_id_or_nothing() -> None:
    from dataclasses import replace

    from openopen8.core.schemas import ImageRequest

    req = ImageRequest(endpoint="generations", model="m", prompt="p", n=1, size=None, quality=None,
                       response_format="url", fields={"prompt": "p", "user": "alice@example.com"})
    bare = replace(req, fields={"prompt": "p"})
    as_client, as_token, as_none = (replace(target(1), end_user=mode) for mode in ("client", "token", "none"))
    assert with_end_user(req, as_client, token_id="oo8-t").fields == {"prompt": "p", "user": "alice@example.com"}
    assert with_end_user(req, as_token, token_id="oo8-t").fields == {"prompt": "p", "user": "oo8-t"}
    assert with_end_user(bare, as_token, token_id="oo8-t").fields == {"prompt": "p", "user": "oo8-t"}
    safety = replace(req, fields={"prompt": "p", "safety_identifier": "alice"})
    assert with_end_user(safety, as_token, token_id="oo8-t").fields == {"prompt": "p", "safety_identifier": "oo8-t"}
    assert with_end_user(req, as_none, token_id="oo8-t").fields == {"prompt": "p"}
