"""Untrusted text made safe for a terminal or a log line.

Text from outside (a peer's alert detail, a VM's status fields, site-supplied names, file names)
can carry terminal escape sequences (ESC, CSI), carriage returns that overwrite what a reader
sees, newlines that forge a second log line, bidi overrides that reorder it, and sheer size.
:func:`printable` returns a rendering on one line, at most ``limit`` characters long, in which
every character that is not printable is escaped visibly (``\\x1b``, ``\\n``, ``\\u202e``):
the C0 controls, DEL, the C1 controls (8-bit CSI, NEL), and every other character Unicode does
not call printable (format characters such as bidi overrides and zero-width spaces, line and
paragraph separators, spaces other than U+0020, private-use, unassigned and surrogate code
points). Printable non-ASCII (letters, a dash) stays as it is.

A backslash is left as it is, which makes the rendering idempotent: text rendered by one layer
(the protocol's alert detail) and again by the next (the agent's log, the owner's terminal)
reads the same instead of growing ``\\\\``. The price is that a literal ``\\x1b`` typed by a
peer reads like an escaped ESC; both are four harmless characters.

Cheap to import (the agent's boot path imports it): no imports beyond the language itself.
"""

from __future__ import annotations

DEFAULT_LIMIT = 512
_MIN_LIMIT = 16
_SAFE_FIRST, _SAFE_LAST = 0x20, 0x7E
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    if _SAFE_FIRST <= code <= _SAFE_LAST or (code > _SAFE_LAST and char.isprintable()):
        return char
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` rendered as at most ``limit`` printable characters on one line.

    A truncated rendering ends in ``...[+N]``, N being the number of input characters left out,
    so a reader knows there was more and a truncation cannot pass for the whole text.
    """
    limit = max(limit, _MIN_LIMIT)
    if len(text) <= limit and text.isprintable():
        return text  # the common case, without a loop
    parts: list[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = _escape(char)
        if used + len(piece) > limit:
            return _truncated(parts, used, limit, len(text) - index)
        parts.append(piece)
        used += len(piece)
    return "".join(parts)


def _truncated(parts: list[str], used: int, limit: int, left: int) -> str:
    # Drop whole escapes (never half of one) until the marker fits.
    while True:
        marker = f"...[+{left}]"
        if used + len(marker) <= limit or not parts:
            return "".join(parts) + marker
        used -= len(parts.pop())
        left += 1


def ascii_number(text: str, most: int = 20) -> bool:
    """``text`` is 1 to ``most`` ASCII digits: what may go to int() as a count from outside.
    str.isdigit alone also says yes to '¹' or '٣' (a latin-1 header byte, a forged file name),
    for which int() raises ValueError, or reads a number the sender spelled in another script."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()
