"""gunicorn.conf.py as operators run it: several gateways on one machine each keep their own control socket."""

from __future__ import annotations

import tempfile
from pathlib import Path

from django.test import TransactionTestCase
from gunicorn.ctl.client import ControlClient  # type: ignore[import-untyped]

from tests.processes import gateway_process


def listening_at(control_socket: Path) -> list[str]:
    """What the gateway behind this control socket says it listens on (gunicornc's 'show listeners')."""
    with ControlClient(str(control_socket), timeout=5) as client:
        return [listener["address"] for listener in client.send_command("show listeners")["listeners"]]


class ControlSocketTests(TransactionTestCase):
    def test_two_gateways_on_one_machine_each_answer_on_their_own_control_socket(self) -> None:
        first_data, second_data = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        first, first_master = gateway_process(self.addCleanup, OPENOPEN8_DATA_DIR=str(first_data))
        second, _second_master = gateway_process(self.addCleanup, OPENOPEN8_DATA_DIR=str(second_data))
        self.assertEqual(listening_at(first_data / "gunicorn.ctl"), [first])
        self.assertEqual(listening_at(second_data / "gunicorn.ctl"), [second])
        # The first one stopping takes only its own socket away.
        first_master.terminate()
        self.assertEqual(first_master.wait(20), 0)
        self.assertFalse((first_data / "gunicorn.ctl").exists())
        self.assertEqual(listening_at(second_data / "gunicorn.ctl"), [second])
