"""imprint/timeouts.py: the production deadlines are the defaults; an IMPRINT_*_SECONDS variable
replaces one in a real process, and a bad value stops that process naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from imprint import timeouts

PRODUCTION = {  # docs/protocol.md §5.3 and §6.5 state these
    "imprint.guest.server:HANDSHAKE_DEADLINE": 10.0,
    "imprint.guest.control:REQUEST_DEADLINE": 30.0,
    "imprint.owner.bind:CONNECT_TIMEOUT": 10.0,
    "imprint.owner.client:TIMEOUT": 10.0,
    # The VM dials its owner (docs/protocol.md §4.6).
    "imprint.guest.dialer:CONNECT_TIMEOUT": 10.0,
    "imprint.guest.dialer:RECONNECT_FIRST": 10.0,
    "imprint.guest.dialer:RECONNECT_CAP": 300.0,
    "imprint.owner.serve:HANDSHAKE_SECONDS": 10.0,
    "imprint.owner.serve:EXCHANGE_SECONDS": 20.0,
    "imprint.owner.serve:WAIT_SECONDS": 600.0,
}
VARIABLES = {
    "imprint.guest.server:HANDSHAKE_DEADLINE": "IMPRINT_AGENT_HANDSHAKE_SECONDS",
    "imprint.guest.control:REQUEST_DEADLINE": "IMPRINT_AGENT_REQUEST_SECONDS",
    "imprint.owner.bind:CONNECT_TIMEOUT": "IMPRINT_OWNER_CONNECT_SECONDS",
    "imprint.owner.client:TIMEOUT": "IMPRINT_OWNER_REQUEST_SECONDS",
    "imprint.guest.dialer:CONNECT_TIMEOUT": "IMPRINT_AGENT_CONNECT_SECONDS",
    "imprint.guest.dialer:RECONNECT_FIRST": "IMPRINT_AGENT_RECONNECT_SECONDS",
    "imprint.guest.dialer:RECONNECT_CAP": "IMPRINT_AGENT_RECONNECT_CAP_SECONDS",
    "imprint.owner.serve:HANDSHAKE_SECONDS": "IMPRINT_SERVE_HANDSHAKE_SECONDS",
    "imprint.owner.serve:EXCHANGE_SECONDS": "IMPRINT_SERVE_EXCHANGE_SECONDS",
    "imprint.owner.serve:WAIT_SECONDS": "IMPRINT_SERVE_WAIT_SECONDS",
}


def _value_in_a_process(where: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    module, name = where.split(":")
    code = f"import {module} as m; print(m.{name})"
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES.values()}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**clean, **env}, check=False)


@pytest.mark.parametrize("where", list(PRODUCTION))
def test_the_default_is_the_production_deadline_and_the_variable_replaces_it(where: str) -> None:
    default = _value_in_a_process(where, {})
    assert default.returncode == 0, default.stderr
    assert float(default.stdout) == PRODUCTION[where]
    injected = _value_in_a_process(where, {VARIABLES[where]: "2.5"})
    assert injected.returncode == 0, injected.stderr
    assert float(injected.stdout) == 2.5


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "nan", "inf", "1e999"])
def test_a_bad_value_is_refused_naming_the_variable(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRINT_TEST_SECONDS", text)  # the environment is this function's input
    with pytest.raises(timeouts.BadTimeout, match="^IMPRINT_TEST_SECONDS: .* number of seconds$"):
        timeouts.seconds("IMPRINT_TEST_SECONDS", 10.0)


def test_unset_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMPRINT_TEST_SECONDS", raising=False)
    assert timeouts.seconds("IMPRINT_TEST_SECONDS", 7.0) == 7.0
