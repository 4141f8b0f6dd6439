"""The OpenAI-compatible adapter on plain values, without a database or a server (its wire tests are the images API's,
tests/gateway/test_images_api.py, which every other adapter also shares)."""

from __future__ import annotations

from channels.adapters import get_adapter
from openopen8.core.errors import ContentPolicyViolation, UpstreamError, UpstreamKeyRejected
from openopen8.core.schemas import ImagesResponse
from tests.adapters import KEY, answer, png_input, request, target


def test_it_forwards_the_clients_fields_with_the_mapped_model_and_bearer_key() -> None:
    channel = target("openai", model_map={"dall-e-3": "provider-model"})
    upstream = get_adapter("openai").build_request(request(model="dall-e-3", size="1024x1024", user="u1"), channel)
    assert (upstream.method, upstream.url) == ("POST", "https://provider.example/v1/images/generations")
    assert upstream.headers == {"Authorization": f"Bearer {KEY}"}
    assert upstream.json is not None and upstream.json["model"] == "provider-model" and upstream.json["user"] == "u1"


def test_an_edit_goes_as_multipart_with_openais_field_names() -> None:
    upstream = get_adapter("openai").build_request(
        request("edits", model="gpt-image-1.5", images=(png_input(), png_input())), target("openai"))
    assert upstream.url.endswith("/images/edits") and upstream.json is None
    assert [part.field for part in upstream.files] == ["image[]", "image[]"]
    assert upstream.form is not None and upstream.form["model"] == "gpt-image-1.5"


def test_it_reads_openais_answer() -> None:
    result = get_adapter("openai").parse_response(answer(200, {"created": 7, "data": [{"url": "https://i/1.png"}],
                                                               "usage": {"total_tokens": 3}}),
                                                  request(model="dall-e-3"), target("openai"))
    assert isinstance(result, ImagesResponse)
    assert result.to_dict() == {"created": 7, "data": [{"url": "https://i/1.png"}], "usage": {"total_tokens": 3}}


def test_a_malformed_answer_is_the_channels_fault() -> None:
    try:
        get_adapter("openai").parse_response(answer(200, {"data": [{}]}), request(model="dall-e-3"), target("openai"))
    except UpstreamError as error:
        assert error.channel_fault
    else:
        raise AssertionError("a malformed answer was accepted")


def test_it_tells_the_clients_faults_from_the_channels() -> None:
    adapter, channel = get_adapter("openai"), target("openai")
    refused = adapter.parse_error(answer(400, {"error": {"message": "no", "code": "content_policy_violation"}}),
                                  channel)
    assert isinstance(refused, ContentPolicyViolation) and not refused.channel_fault
    invalid = adapter.parse_error(answer(400, {"error": {"message": "bad size", "param": "size"}}), channel)
    assert (invalid.status, invalid.param, invalid.channel_fault) == (400, "size", False)
    assert isinstance(adapter.parse_error(answer(401, {"error": {"message": "bad key"}}), channel),
                      UpstreamKeyRejected)
    limited = adapter.parse_error(answer(429, {}, headers={"retry-after": "7"}), channel)
    assert (limited.channel_fault, limited.retry_after) == (True, 7)
    assert adapter.parse_error(answer(503, b"busy"), channel).channel_fault
