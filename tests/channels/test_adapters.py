"""The adapter registry's call (channels/adapters/__init__.py): n spread over parallel calls, and what comes back."""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

from channels.adapters import call
from channels.adapters.openai import OpenAICompatibleAdapter
from tests.adapters import request, target
from tests.factories import openai_images
from tests.fake_upstream import FakeUpstream, Recorded


def test_the_usage_of_parallel_calls_is_summed_over_those_that_delivered() -> None:
    lock, calls = threading.Lock(), [0]

    def provider(rec: Recorded) -> Any:
        with lock:
            calls[0] += 1
            turn = calls[0]
        if turn == 2:
            return 500, {"error": {"message": "one of the calls fails"}}
        return openai_images(1, usage={"input_tokens": 10, "input_tokens_details": {"text_tokens": 10},
                                       "output_tokens": 100 * turn, "total_tokens": 10 + 100 * turn})

    with FakeUpstream() as up, mock.patch.object(OpenAICompatibleAdapter, "images_per_call", return_value=1):
        up.respond(200, provider)
        result, _latency = call(target("openai", base_url=up.url), request(n=3, model="gpt-image-2"), timeout=10)
    assert len(result.data) == 2  # the failed call's image is not there, and neither is its usage
    assert result.extra["usage"] == {"input_tokens": 20, "input_tokens_details": {"text_tokens": 20},
                                     "output_tokens": 100 + 300, "total_tokens": 20 + 400}  # calls 1 and 3
