"""The token parser (tokens.parse) on arbitrary text, with and without an expected kind.

Bytes become text with surrogateescape, as the command line hands non-UTF-8 arguments to Python.
Only TokenError may leave. An accepted text is the token's one spelling up to case and surrounding
whitespace: ASCII, and it re-encodes to exactly the lower-cased, stripped input.
"""

from __future__ import annotations

from imprint import tokens
from imprint.tokens import TokenError, TokenKind

_EXPECT: tuple[TokenKind | None, ...] = (None, *TokenKind)


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for expect in _EXPECT:
        try:
            token = tokens.parse(text, expect=expect)
        except TokenError:
            continue
        assert expect is None or token.kind is expect
        core = text.strip()
        assert core.isascii(), f"accepted a non-ASCII spelling: {core!r}"
        assert token.encode() == core.lower(), "accepted a second spelling of a token"
        assert tokens.parse(token.encode()) == token
