"""The secret mask (openopen8/core/errors.py)."""

from __future__ import annotations

import base64
from urllib.parse import quote

from openopen8.core.errors import InvalidRequest, mask_error, mask_secrets


def test_every_form_a_sent_credential_takes_is_masked() -> None:
    pair = "webui:pa55/w0rd+x"
    basic = "Basic " + base64.b64encode(pair.encode()).decode()
    for echoed in (pair, "pa55/w0rd+x", basic, base64.b64encode(pair.encode()).decode().rstrip("="),
                   base64.urlsafe_b64encode(pair.encode()).decode(), quote("pa55/w0rd+x", safe="")):
        assert "pa55" not in mask_secrets(f"bad credentials: {echoed}!", basic)
        assert mask_secrets(f"bad credentials: {echoed}!", basic).startswith("bad credentials: ")


def test_the_user_name_of_a_pair_and_short_values_are_left_alone() -> None:
    assert mask_secrets("user webui unknown", "webui:pa55word") == "user webui unknown"


def test_a_code_or_param_that_is_not_an_identifier_or_holds_a_secret_is_dropped() -> None:
    error = mask_error(InvalidRequest("no", code="sk-abcdef0123456789", param="prompt"), "sk-abcdef0123456789")
    assert (error.code, error.param) == (None, "prompt")
    error = mask_error(InvalidRequest("no", code="invalid value!", param="x" * 100))
    assert (error.code, error.param) == (None, None)
    assert mask_error(InvalidRequest("no", code="invalid_value", param="image[0]")).code == "invalid_value"
