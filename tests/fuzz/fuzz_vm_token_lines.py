"""The VM-token line finder (tokens.find_vm_token_lines) on arbitrary console text.

It never raises, and finds only VM tokens. Where tokens.py has the anchored announcement reader
(find_vm_token_announcements, issue 9 item 1), every announcement it finds is a whole line of the
text, exactly as the agent writes it (one trailing CR allowed, as a serial console adds): never a
marker in the middle of a line, after a CR or another line separator.
"""

from __future__ import annotations

from imprint import tokens
from imprint.tokens import TokenKind


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    found = tokens.find_vm_token_lines(text)
    assert all(token.kind is TokenKind.VM for token in found)
    announcements = getattr(tokens, "find_vm_token_announcements", None)
    if announcements is None:
        return
    found_announcements = announcements(text)
    assert [a.token for a in found_announcements] == found
    lines = {line.removesuffix("\r") for line in text.split("\n")}
    for a in found_announcements:
        written = f"{tokens.VM_TOKEN_LINE_PREFIX} {a.token.encode()}" + (f" for {a.answers}" if a.answers else "")
        assert written in lines, f"an announcement that is not a whole line: {written!r}"
