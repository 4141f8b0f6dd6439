"""The client API's OpenAPI description (gateway/openapi.json) holds: schemathesis generates requests from it, valid
and not, sends them to the app in-process, and checks every answer against it (no server error, a documented status,
content type, headers and body)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.factories import make_channel, make_token

# Django's application alone: openopen8.wsgi would start the process's background work (the runtime) in the test run.
schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", get_wsgi_application())


@pytest.fixture
def key(transactional_db: Any) -> str:
    make_channel(kind="placeholder", models="*")
    return make_token(name="schemathesis")[1]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_what_the_description_says(case: Any, key: str) -> None:
    # Which schema-valid requests succeed depends on the model's rules (its sizes, qualities, fields), which the
    # description leaves to the model table: a refusal of one is a documented 400, not a failure.
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, excluded_checks=[positive_data_acceptance])


def test_the_description_is_served_without_a_key(client: Any) -> None:
    r = client.get("/v1/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"] == "3.1.0"
    assert set(r.json()["paths"]) >= {"/v1/images/generations", "/v1/images/edits", "/v1/models",
                                      "/v1/dashboard/billing/usage"}
