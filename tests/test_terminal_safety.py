"""Untrusted text reaches the owner's terminal and the agent's log only through safetext."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imprint.safetext import ascii_number, printable

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import with_prelude

HOSTILE = [
    "\x1b[2J\x1b]0;pwned\x07",          # clear screen, set the window title
    "ok\rFAKE",                           # carriage return overwrites what the reader sees
    "one\ntwo",                           # a second, forged line
    "nul\x00del\x7fc1\x85\x9b31m",       # NUL, DEL, NEL, the 8-bit CSI
    "bidi \u202eevil\u202c zw\u200b ls\u2028ps\u2029",
    "astral \U0001f600 surrogate \udcff",
    "tab\tbackslash\\x1b",
]


@pytest.mark.parametrize(("text", "most", "number"), [
    ("0", 20, True), ("1048576", 20, True), ("9" * 20, 20, True), ("9" * 21, 20, False), ("200", 3, True),
    ("", 20, False), ("-1", 20, False), ("+1", 20, False), (" 1", 20, False), ("1_000", 20, False),
    ("\u00b9", 20, False),    # SUPERSCRIPT ONE: a latin-1 header byte; isdigit() says yes, int() raises
    ("1\u00b92", 20, False),
    ("\u0663", 20, False),    # ARABIC-INDIC THREE: int() reads it as 3
    ("\uff11", 20, False),    # FULLWIDTH ONE
])
def test_ascii_number_takes_ascii_digits_only(text: str, most: int, number: bool) -> None:
    """What may go to int() as a count from outside: the check the owner's answer reader, the
    metadata client and the CLI share (the fuzz target owner_answer found the isdigit() hole)."""
    assert ascii_number(text, most) is number
    if number:
        assert int(text) >= 0


@pytest.mark.parametrize("text", HOSTILE)
def test_printable_is_one_line_of_printable_characters(text: str) -> None:
    out = printable(text)
    assert out.isprintable(), out
    assert not any(c in out for c in "\n\r\x1b\x9b\x85\u2028\u202e")
    out.encode("utf-8")  # no lone surrogate left to fail at print time


def test_every_non_printable_code_point_is_escaped() -> None:
    for code in range(0x110000):
        char = chr(code)
        out = printable(char)
        assert out.isprintable() and (out == char) == char.isprintable()


def test_escapes_are_visible() -> None:
    assert printable("a\x1bb") == "a\\x1bb"
    assert printable("x\r\n\t") == "x\\r\\n\\t"
    assert printable("\u202e") == "\\u202e"
    assert printable("\U0001f600") == "\U0001f600"  # printable
    assert printable("\U000e0001") == "\\U000e0001"  # LANGUAGE TAG, a format character
    assert printable("caf\xe9 \u2014 \u00e5") == "caf\xe9 \u2014 \u00e5"  # printable non-ASCII stays
    assert printable("nb\xa0sp zw\u200bj") == "nb\\xa0sp zw\\u200bj"
    assert printable("plain text: 1-2 [ok] C:\\dir") == "plain text: 1-2 [ok] C:\\dir"


@pytest.mark.parametrize("text", HOSTILE)
def test_rendering_is_idempotent(text: str) -> None:
    """Layers each render (the protocol's alert text, the agent's log, the owner's terminal)."""
    once = printable(text)
    assert printable(once) == once


@pytest.mark.parametrize("limit", [16, 40, 100])
def test_length_is_bounded_with_a_marker(limit: int) -> None:
    for text in ("x" * 10_000, "\x1b" * 10_000, "\U0001f600" * 10_000, "ab\x1b" * 5000):
        out = printable(text, limit)
        assert len(out) <= limit
        assert out.endswith("]") and "...[+" in out
    assert printable("x" * limit, limit) == "x" * limit  # exactly at the limit: whole, no marker


def test_truncation_never_splits_an_escape() -> None:
    out = printable("\x1b" * 100, 30)
    body = out[: out.index("...[+")]
    assert body == "\\x1b" * (len(body) // 4)
    left = int(out[out.index("[+") + 2 : -1])
    assert left == 100 - len(body) // 4


# -- the owner's terminal: a compromised VM answers with escape sequences ------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[1;31m\u202eevil\x9b31m\r\nFAKE: all good"


def _compromised(fields: dict[str, object]) -> str:
    """Code run inside a real agent process before its main: its status answer carries
    ``fields``, as an agent a compromised VM's root replaced would send over the pinned channel."""
    return (
        "import json\n"
        "from imprint.guest import server\n"
        "_real = server.AgentServer.status\n"
        f"_fields = json.loads({json.dumps(json.dumps(fields))})\n"
        "server.AgentServer.status = lambda self: {**_real(self), **_fields}\n"
    )


def _safe_for_a_terminal(out: str) -> None:
    assert all(c == "\n" or c.isprintable() for c in out), repr(out)
    assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out and "\r" not in out


@pytest.fixture
def bound_vm(agents: AgentFactory, owner: Owner, tmp_path: Path) -> Path:
    token = owner.token("vm1", "shared")
    root = agents.make_root(token)
    agent = agents.start(root)
    owner.run("bind", "vm1", "--address", agent.address)
    agent.kill()
    return root


def test_status_fields_from_the_vm_are_rendered(agents: AgentFactory, owner: Owner, bound_vm: Path,
                                                tmp_path: Path) -> None:
    fields = {"mode": ESCAPES, "agent_version": ESCAPES, "uptime_seconds": ESCAPES, "state": ESCAPES}
    agent = agents.start(bound_vm, log=tmp_path / "agent.log", launcher=with_prelude(_compromised(fields)))
    result = owner.run("status", "vm1", "--address", agent.address)
    _safe_for_a_terminal(result.stdout + result.stderr)
    assert "\\x1b]0;owned\\x07\\x1b[2J" in result.stdout  # shown, escaped: not silently dropped
    as_json = owner.run("status", "vm1", "--address", agent.address, "--json")
    _safe_for_a_terminal(as_json.stdout)
    assert json.loads(as_json.stdout)["mode"] == ESCAPES  # JSON keeps the exact text, escaped


def test_error_texts_from_the_vm_are_rendered(agents: AgentFactory, owner: Owner, bound_vm: Path,
                                              tmp_path: Path) -> None:
    agent = agents.start(bound_vm, log=tmp_path / "agent.log",
                         launcher=with_prelude(_compromised({"owner_fingerprint": ESCAPES})))
    refused = owner.run("status", "vm1", "--address", agent.address, check=3)
    _safe_for_a_terminal(refused.stdout + refused.stderr)
    assert "\\x1b]0;owned" in refused.stderr
    refused_json = owner.run("status", "vm1", "--address", agent.address, "--json", check=3)
    _safe_for_a_terminal(refused_json.stdout + refused_json.stderr)
    assert ESCAPES in json.loads(refused_json.stdout)["error"]
    audit = owner.run("audit", "vm1")
    _safe_for_a_terminal(audit.stdout + audit.stderr)
