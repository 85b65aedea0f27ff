"""Token text forms.

A token is one line with no spaces so that it fits a kernel command line:

    imprint1<kind>-<base32 of 32-byte payload + 4-byte check>

kind ``s``: shared-secret mode, the payload is K (a secret).
kind ``n``: no-secrets mode, the payload is SHA-256 of the owner's SubjectPublicKeyInfo.
kind ``v``: the VM token sent back in no-secrets mode, SHA-256 of the VM's SubjectPublicKeyInfo.

The check is the first 4 bytes of SHA-256 over a label, the prefix and the payload: a typo or a
truncation is reported as a corrupt token, never confused with an authentication failure.
Error messages never quote the token, which may carry K.

This module must stay cheap to import: the agent parses a token before anything heavier loads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum

VERSION = 1
PAYLOAD_BYTES = 32
CHECK_BYTES = 4
VM_TOKEN_LINE_PREFIX = "IMPRINT-VM-TOKEN"  # noqa: S105 (a label, not a secret)
_MAX_TOKEN_CHARS = 128
_SHAPE = re.compile(r"imprint(0|[1-9][0-9]{0,5})([a-z])-([a-z2-7]+)", re.ASCII)


class TokenError(ValueError):
    """A token that is malformed, corrupt or of an unsupported version."""


class TokenKind(Enum):
    SHARED = "s"
    NOSECRET = "n"
    VM = "v"


class Mode(Enum):
    """The key-exchange mode a token selects."""

    SHARED = "shared"
    NOSECRET = "nosecret"


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.payload) != PAYLOAD_BYTES:
            raise TokenError(f"token payload must be {PAYLOAD_BYTES} bytes")

    @property
    def mode(self) -> Mode:
        return Mode.SHARED if self.kind is TokenKind.SHARED else Mode.NOSECRET

    @property
    def is_secret(self) -> bool:
        return self.kind is TokenKind.SHARED

    @property
    def token_id(self) -> bytes:
        """8 bytes naming this token without revealing it (safe to log and to send)."""
        if self.kind is TokenKind.SHARED:
            # A one-way function of K: knowing the id does not help find K.
            return hashlib.sha256(b"imprint/1 token id\0" + self.payload).digest()[:8]
        return self.payload[:8]

    def encode(self) -> str:
        prefix = f"imprint{VERSION}{self.kind.value}"
        body = self.payload + _check(prefix, self.payload)
        return f"{prefix}-{base64.b32encode(body).decode().rstrip('=').lower()}"

    def __repr__(self) -> str:
        shown = "<secret>" if self.is_secret else self.payload.hex()
        return f"Token({self.kind.name}, id={self.token_id.hex()}, {shown})"

    def __str__(self) -> str:
        return repr(self)


def _check(prefix: str, payload: bytes) -> bytes:
    return hashlib.sha256(b"imprint token check\0" + prefix.encode() + payload).digest()[:CHECK_BYTES]


def parse(text: str, *, expect: TokenKind | None = None) -> Token:
    """Parse a token; raises TokenError naming the fault (never echoing the token)."""
    if len(text) > _MAX_TOKEN_CHARS:
        raise TokenError(f"token is too long ({len(text)} characters; at most {_MAX_TOKEN_CHARS})")
    cleaned = text.strip()
    if not cleaned.isascii():
        # Checked before lower(): "\u212a" (KELVIN SIGN) lower-cases to "k", and a second spelling
        # of a token must not exist.
        raise TokenError("token is malformed: it contains non-ASCII characters")
    cleaned = cleaned.lower()
    if not cleaned:
        raise TokenError("token is empty")
    match = _SHAPE.fullmatch(cleaned)
    if match is None:
        raise TokenError("token is malformed: expected imprint<version><kind>-<base32>")
    version, kind_letter, b32 = int(match.group(1)), match.group(2), match.group(3)
    if version != VERSION:
        raise TokenError(f"token version {version} is not supported (this imprint reads version {VERSION})")
    try:
        kind = TokenKind(kind_letter)
    except ValueError:
        raise TokenError(f"token kind '{kind_letter}' is unknown (expected s, n or v)") from None
    want_chars = -(-(PAYLOAD_BYTES + CHECK_BYTES) * 8 // 5)
    if len(b32) != want_chars:
        raise TokenError(
            f"token is corrupt: {len(b32)} base32 characters where {want_chars} are expected "
            "(truncated or mistyped)"
        )
    try:
        body = base64.b32decode(b32.upper() + "=" * (-len(b32) % 8))
    except binascii.Error:
        raise TokenError("token is corrupt: not valid base32") from None
    if base64.b32encode(body).decode().rstrip("=").lower() != b32:
        # The last character carries 2 spare bits; accepting them non-zero would let a typo pass.
        raise TokenError("token is corrupt: its last character is not a valid ending (mistyped)")
    payload, check = body[:PAYLOAD_BYTES], body[PAYLOAD_BYTES:]
    if not hmac.compare_digest(check, _check(f"imprint{version}{kind_letter}", payload)):
        raise TokenError("token is corrupt: its check digits do not match (mistyped or truncated)")
    token = Token(kind, payload)
    if expect is not None and kind is not expect:
        raise TokenError(f"expected a {expect.name.lower()} token, got a {kind.name.lower()} token")
    return token


# The announcement, a whole line and nothing else: the marker at column 0, the VM token exactly as
# Token.encode writes it (check digits included), and the id of the owner token it answers.
# Agents before issue 9 wrote the line without " for <id>"; that form is still read, but a
# reader that knows which owner token the VM was booted with accepts only lines naming it.
_ANNOUNCEMENT = re.compile(
    VM_TOKEN_LINE_PREFIX + r" (imprint1v-[a-z2-7]{58})(?: for ([0-9a-f]{16}))?\r?", re.ASCII
)
MAX_ANNOUNCEMENT_CHARS = 128


@dataclass(frozen=True)
class Announcement:
    """One VM token line: the token, and the owner token id (hex) it answers (None: old form)."""

    token: Token
    answers: str | None


def vm_token_line(token: Token, answers: Token | None = None) -> str:
    """The announcement the agent writes (without line ends: the writer frames it)."""
    if token.kind is not TokenKind.VM:
        raise TokenError(f"only a VM token is announced, not a {token.kind.name.lower()} token")
    line = f"{VM_TOKEN_LINE_PREFIX} {token.encode()}"
    return line if answers is None else f"{line} for {answers.token_id.hex()}"


def parse_vm_token_line(line: str) -> Announcement | None:
    """The announcement if ``line`` (one line, without its newline) is exactly one, else None.

    Anchored at both ends: a marker in the middle of a line (a log line quoting a peer, a kernel
    message, text after a carriage return that a terminal would show over the start of the
    line) is never an announcement; only a single trailing CR, as a serial console adds, is.
    """
    if len(line) > MAX_ANNOUNCEMENT_CHARS or not line.startswith(VM_TOKEN_LINE_PREFIX):
        return None
    match = _ANNOUNCEMENT.fullmatch(line)
    if match is None:
        return None
    try:
        token = parse(match.group(1), expect=TokenKind.VM)
    except TokenError:
        return None  # garbled on the serial line: the agent repeats the line until bound
    return Announcement(token, match.group(2))


def find_vm_token_announcements(text: str) -> list[Announcement]:
    """Every announcement in a console log or reply area, in order. Lines end at "\n" only:
    the other characters :meth:`str.splitlines` breaks at (NEL, U+2028, a lone CR ...) would let
    text in the middle of a line start one."""
    found: list[Announcement] = []
    for line in text.split("\n"):
        announcement = parse_vm_token_line(line)
        if announcement is not None:
            found.append(announcement)
    return found


def find_vm_token_lines(text: str) -> list[Token]:
    """The VM tokens of :func:`find_vm_token_announcements`, in order."""
    return [a.token for a in find_vm_token_announcements(text)]
