"""Untrusted text reaches the owner's terminal and the agent's log only through safetext."""

from __future__ import annotations

import pytest
from imprint.safetext import printable

HOSTILE = [
    "\x1b[2J\x1b]0;pwned\x07",          # clear screen, set the window title
    "ok\rFAKE",                           # carriage return overwrites what the reader sees
    "one\ntwo",                           # a second, forged line
    "nul\x00del\x7fc1\x85\x9b31m",       # NUL, DEL, NEL, the 8-bit CSI
    "bidi \u202eevil\u202c zw\u200b ls\u2028ps\u2029",
    "astral \U0001f600 surrogate \udcff",
    "tab\tbackslash\\x1b",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_printable_is_one_line_of_printable_ascii(text: str) -> None:
    out = printable(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in out), out
    assert "\n" not in out and "\r" not in out and "\x1b" not in out


def test_escapes_are_visible() -> None:
    assert printable("a\x1bb") == "a\\x1bb"
    assert printable("x\r\n\t") == "x\\r\\n\\t"
    assert printable("\u202e") == "\\u202e"
    assert printable("\U0001f600") == "\\U0001f600"
    assert printable("caf\xe9") == "caf\\xe9"
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
