"""The console is safe to expose: login attempts are throttled (django-axes), and OPENOPEN8_HTTPS turns on what
Django's deployment check asks for."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from django.contrib.auth.models import User
from django.test import TestCase

ROOT = Path(__file__).resolve().parents[2]


class LoginThrottleTests(TestCase):
    def login(self, password: str, address: str = "203.0.113.5") -> int:
        r = self.client.post("/admin/login/?next=/admin/", {"username": "root", "password": password},
                             REMOTE_ADDR=address)
        return r.status_code

    def test_after_five_wrong_passwords_even_the_right_one_is_refused_from_that_address(self) -> None:
        User.objects.create_superuser("root", "root@example.com", "the-right-one")
        answers = [self.login(f"wrong-{i}") for i in range(30)]
        self.assertEqual(answers, [200] * 4 + [429] * 26)  # the form again with an error, then the lockout
        self.assertEqual(self.login("the-right-one"), 429)
        self.assertNotIn("_auth_user_id", self.client.session)
        # Locked by user and address together: the operator still logs in from elsewhere.
        self.assertEqual(self.login("the-right-one", address="198.51.100.7"), 302)


def deploy_check(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENOPEN8_")}
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                          text=True, capture_output=True,
                          env={**clean, "OPENOPEN8_DEBUG": "false", "OPENOPEN8_SECRET_KEY": secrets.token_urlsafe(50),
                               "OPENOPEN8_DATA_DIR": str(ROOT / "data"), **env})


def test_with_openopen8_https_the_deployment_check_is_clean() -> None:
    result = deploy_check(OPENOPEN8_HTTPS="true")
    assert result.returncode == 0, result.stdout + result.stderr
    without = deploy_check()
    assert all(w in without.stdout + without.stderr for w in ("W004", "W008", "W010", "W016"))


PROBE = """
import django, json
django.setup()
from django.test import Client
c = Client(HTTP_HOST="localhost")
secure = c.get("/admin/login/", HTTP_X_FORWARDED_PROTO="https")
print(json.dumps({"plain": c.get("/admin/login/").status_code, "healthz": c.get("/healthz").status_code,
                  "secure": secure.status_code, "hsts": secure.get("Strict-Transport-Security", "")}))
"""


def test_with_openopen8_https_plain_http_is_redirected_but_the_probes_and_https_gets_hsts() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENOPEN8_") and k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, text=True, capture_output=True,
                            env={**clean, "DJANGO_SETTINGS_MODULE": "openopen8.settings", "OPENOPEN8_HTTPS": "true"})
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert (answers["plain"], answers["healthz"]) == (301, 200)
    assert answers["hsts"].startswith("max-age=31536000")
