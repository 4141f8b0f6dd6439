from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from openopen8.core import rules
from openopen8.core.errors import InvalidRequest
from openopen8.core.rules import check_request


def rejects(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check_request(body, endpoint="generations")
    return caught.value


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "dall-e-2"}, "prompt"),
    ({"model": "dall-e-2", "prompt": ""}, "prompt"),
    ({"model": "dall-e-2", "prompt": 5}, "prompt"),
    ({"model": "dall-e-2", "prompt": "x" * 1001}, "prompt"),
    ({"model": "dall-e-3", "prompt": "x" * 4001}, "prompt"),
    ({"model": "gpt-image-1.5", "prompt": "x" * 32001}, "prompt"),
    ({"model": "dall-e-2", "prompt": "a", "n": 0}, "n"),
    ({"model": "dall-e-2", "prompt": "a", "n": 11}, "n"),
    ({"model": "dall-e-2", "prompt": "a", "n": "2"}, "n"),
    ({"model": "dall-e-2", "prompt": "a", "n": True}, "n"),
    ({"model": "dall-e-3", "prompt": "a", "n": 2}, "n"),
    ({"model": "dall-e-2", "prompt": "a", "size": "1792x1024"}, "size"),
    ({"model": "dall-e-3", "prompt": "a", "size": "256x256"}, "size"),
    ({"model": "dall-e-2", "prompt": "a", "quality": "hd"}, "quality"),
    ({"model": "dall-e-3", "prompt": "a", "quality": "high"}, "quality"),
    ({"model": "dall-e-2", "prompt": "a", "style": "vivid"}, "style"),
    ({"model": "dall-e-3", "prompt": "a", "style": "painterly"}, "style"),
    ({"model": "dall-e-2", "prompt": "a", "response_format": "png"}, "response_format"),
    ({"model": "dall-e-3", "prompt": "a", "background": "transparent"}, "background"),
    ({"model": "dall-e-3", "prompt": "a", "output_format": "webp"}, "output_format"),
    ({"model": "gpt-image-1.5", "prompt": "a", "size": "1792x1024"}, "size"),
    ({"model": "gpt-image-1.5", "prompt": "a", "quality": "hd"}, "quality"),
    ({"model": "gpt-image-1.5", "prompt": "a", "style": "vivid"}, "style"),
    ({"model": "gpt-image-1.5", "prompt": "a", "output_compression": 101}, "output_compression"),
    ({"model": "gpt-image-1.5", "prompt": "a", "background": "transparent", "output_format": "jpeg"}, "background"),
    ({"model": "gpt-image-1-mini", "prompt": "a", "moderation": "none"}, "moderation"),
    ({"model": "gpt-image-2", "prompt": "a", "size": "1000x1000"}, "size"),
    ({"model": "gpt-image-2", "prompt": "a", "size": "4096x1024"}, "size"),
    ({"model": "gpt-image-2", "prompt": "a", "size": "3200x800"}, "size"),
    ({"model": "some-model", "prompt": "a", "n": 11}, "n"),
    ({"model": "some-model", "prompt": "a", "response_format": "jpeg"}, "response_format"),
    ({"model": "dall-e-2", "prompt": "a", "stream": True}, "stream"),
    # OpenAI's own fields keep OpenAI's types on a model without a rule too.
    ({"model": "some-model", "prompt": "a", "user": {"id": 1}}, "user"),
    ({"model": "some-model", "prompt": "a", "background": True}, "background"),
    ({"model": "some-model", "prompt": "a", "output_compression": "90"}, "output_compression"),
])
def test_it_refuses_a_bad_field_and_names_it(body: dict[str, Any], param: str) -> None:
    error = rejects(body)
    assert error.param == param
    assert error.status == 400
    assert error.message


def test_it_accepts_every_documented_dall_e_3_option() -> None:
    req = check_request({"model": "dall-e-3", "prompt": "a", "n": 1, "size": "1792x1024", "quality": "hd",
                         "style": "natural", "response_format": "b64_json", "user": "u1"}, endpoint="generations")
    assert (req.size, req.quality, req.response_format, req.n) == ("1792x1024", "hd", "b64_json", 1)


def test_it_resolves_defaults_for_pricing_without_sending_them() -> None:
    req = check_request({"model": "dall-e-3", "prompt": "a"}, endpoint="generations")
    assert (req.size, req.quality, req.response_format, req.n) == ("1024x1024", "standard", "url", 1)
    assert "size" not in req.fields and "quality" not in req.fields


def test_it_defaults_to_dall_e_2_like_openai() -> None:
    assert check_request({"prompt": "a"}, endpoint="generations").model == "dall-e-2"
    assert check_request({"prompt": "a", "background": "opaque"}, endpoint="generations").model == "gpt-image-1.5"


def test_it_accepts_gpt_image_2_custom_sizes_and_snapshots() -> None:
    req = check_request({"model": "gpt-image-2-2026-04-21", "prompt": "a", "size": "2048x1152"}, endpoint="generations")
    assert req.size == "2048x1152"


def test_gpt_image_models_answer_b64_by_default_and_never_forward_response_format() -> None:
    req = check_request({"model": "gpt-image-1.5", "prompt": "a"}, endpoint="generations")
    assert req.response_format == "b64_json"
    hosted = check_request({"model": "gpt-image-1.5", "prompt": "a", "response_format": "url"}, endpoint="generations")
    assert hosted.response_format == "url" and "response_format" not in hosted.fields


def test_a_model_without_rule_gets_basic_checks_and_keeps_unknown_fields() -> None:
    req = check_request({"model": "flux-dev", "prompt": "a", "n": 4, "size": "999x333", "seed": 7,
                         "negative_prompt": "blur", "extra": {"x": [1]}}, endpoint="generations")
    assert req.fields["seed"] == 7 and req.fields["negative_prompt"] == "blur" and req.fields["extra"] == {"x": [1]}
    assert req.size == "999x333" and req.n == 4


def test_unknown_fields_pass_through_for_ruled_models_too() -> None:
    req = check_request({"model": "dall-e-3", "prompt": "a", "watermark": False, "safety_identifier": "h1"},
                        endpoint="generations")
    assert req.fields["watermark"] is False and req.fields["safety_identifier"] == "h1"


def test_an_operator_rules_file_adds_and_overrides_models(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"models": {
        "flux-*": {"family": "flux", "prompt_max": 10, "n_max": 4, "sizes": ["512x512"], "default_size": "512x512",
                   "qualities": ["standard"], "default_quality": "standard", "response_formats": ["url", "b64_json"],
                   "default_response_format": "url", "fields": {}},
        "dall-e-3": {"like": "dall-e-2"}}}))
    settings.OPENOPEN8_MODEL_RULES_FILE = str(path)
    rules.load_table.cache_clear()
    try:
        assert rejects({"model": "flux-dev", "prompt": "x" * 11}).param == "prompt"
        assert rejects({"model": "flux-dev", "prompt": "a", "size": "1024x1024"}).param == "size"
        assert check_request({"model": "dall-e-3", "prompt": "a", "n": 5}, endpoint="generations").n == 5
    finally:
        rules.load_table.cache_clear()
