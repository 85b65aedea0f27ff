"""Token text forms: examples of what an operator meets (see imprint/tokens.py)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from imprint import tokens
from imprint.tokens import Token, TokenError, TokenKind

K = bytes.fromhex("00112233445566778899aabbccddeeff102132435465768798a9bacbdcedfe0f")
KINDS = list(TokenKind)


def b32_part(text: str) -> str:
    return text.split("-", 1)[1]


@pytest.mark.parametrize("kind", KINDS)
def test_token_fits_a_kernel_command_line(kind: TokenKind) -> None:
    text = Token(kind, K).encode()
    # One word of the kernel command line: no spaces, quotes or '='; short, ASCII, one line.
    assert re.fullmatch(r"imprint1[snv]-[a-z2-7]+", text)
    assert not any(c.isspace() for c in text)
    assert '"' not in text and "'" not in text and "=" not in text
    assert text.isascii() and text.isprintable()
    assert len(text) == 68
    # COMMAND_LINE_SIZE is 2048 on x86 and 256 on the smallest architectures.
    assert len(f"imprint.token={text}") < 256
    assert tokens.parse(text) == Token(kind, K)


def test_token_text_is_the_same_on_every_encode() -> None:
    assert Token(TokenKind.SHARED, K).encode() == Token(TokenKind.SHARED, K).encode()
    assert Token(TokenKind.SHARED, K).encode() != Token(TokenKind.NOSECRET, K).encode()


@pytest.mark.parametrize("version", [0, 2, 9, 10, 123])
def test_unknown_version_names_the_version(version: int) -> None:
    text = Token(TokenKind.SHARED, K).encode().replace("imprint1", f"imprint{version}", 1)
    with pytest.raises(TokenError, match=rf"version {version} is not supported") as info:
        tokens.parse(text)
    assert "version 1" in str(info.value)  # and the one this side reads
    assert b32_part(text) not in str(info.value)


def test_unknown_kind_is_named_without_echoing_the_token() -> None:
    text = Token(TokenKind.SHARED, K).encode().replace("imprint1s", "imprint1x", 1)
    with pytest.raises(TokenError, match="kind 'x' is unknown") as info:
        tokens.parse(text)
    assert b32_part(text) not in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("expect", KINDS)
def test_wrong_kind_with_expect(kind: TokenKind, expect: TokenKind) -> None:
    text = Token(kind, K).encode()
    if kind is expect:
        assert tokens.parse(text, expect=expect) == Token(kind, K)
        return
    with pytest.raises(TokenError) as info:
        tokens.parse(text, expect=expect)
    message = str(info.value)
    assert f"expected a {expect.name.lower()} token, got a {kind.name.lower()} token" in message
    assert b32_part(text) not in message


def test_corrupt_token_message_says_corrupt_not_authentication() -> None:
    text = Token(TokenKind.SHARED, K).encode()
    typo = text[:20] + ("a" if text[20] != "a" else "b") + text[21:]
    with pytest.raises(TokenError, match="corrupt: its check digits do not match") as info:
        tokens.parse(typo)
    assert b32_part(typo) not in str(info.value)
    with pytest.raises(TokenError, match="truncated or mistyped"):
        tokens.parse(text[:-3])


@pytest.mark.parametrize(("text", "fault"), [
    ("", "empty"),
    ("   \n", "empty"),
    ("imprint", "malformed"),
    ("imprint1s", "malformed"),
    ("imprint1s-", "malformed"),
    ("imprint1s-AAAA!!", "malformed"),
    ("x" * 129, "too long"),
])
def test_malformed_input_names_the_fault(text: str, fault: str) -> None:
    with pytest.raises(TokenError, match=fault):
        tokens.parse(text)


def test_token_id_is_stable_and_does_not_reveal_k() -> None:
    token = Token(TokenKind.SHARED, K)
    token_id = token.token_id
    assert len(token_id) == 8
    assert token_id == Token(TokenKind.SHARED, K).token_id == tokens.parse(token.encode()).token_id
    # A one-way function of K, not a piece of it.
    assert token_id == hashlib.sha256(b"imprint/1 token id\0" + K).digest()[:8]
    for i in range(len(K) - len(token_id) + 1):
        assert K[i : i + len(token_id)] != token_id
    assert Token(TokenKind.SHARED, bytes(32)).token_id != token_id


def test_token_id_of_public_tokens_is_their_prefix() -> None:
    # No-secrets and VM tokens are hashes of public keys: naming them by their prefix is safe.
    assert Token(TokenKind.NOSECRET, K).token_id == K[:8]
    assert Token(TokenKind.VM, K).token_id == K[:8]


def test_repr_of_a_shared_token_does_not_contain_k() -> None:
    token = Token(TokenKind.SHARED, K)
    text = token.encode()
    for shown in (repr(token), str(token), f"{token}", f"{token!r}", repr([token]), repr({"t": token})):
        assert "<secret>" in shown
        assert K.hex() not in shown
        assert K.hex()[:16] not in shown
        assert b32_part(text) not in shown
        assert base64.b32encode(K).decode().lower()[:16] not in shown.lower()
        assert repr(K) not in shown
        assert token.token_id.hex() in shown  # it is named by its id instead


def test_repr_of_public_tokens_shows_the_payload() -> None:
    assert K.hex() in repr(Token(TokenKind.NOSECRET, K))
    assert K.hex() in repr(Token(TokenKind.VM, K))


def test_payload_length_is_enforced() -> None:
    with pytest.raises(TokenError):
        Token(TokenKind.SHARED, K[:31])
    with pytest.raises(TokenError):
        Token(TokenKind.SHARED, K + b"\0")


def test_modes() -> None:
    assert Token(TokenKind.SHARED, K).mode is tokens.Mode.SHARED and Token(TokenKind.SHARED, K).is_secret
    assert Token(TokenKind.NOSECRET, K).mode is tokens.Mode.NOSECRET
    assert Token(TokenKind.VM, K).mode is tokens.Mode.NOSECRET
    assert not Token(TokenKind.VM, K).is_secret


def test_find_vm_token_lines_in_a_noisy_console_log() -> None:
    first = Token(TokenKind.VM, K)
    second = Token(TokenKind.VM, bytes(range(32)))
    shared = Token(TokenKind.SHARED, K)
    owner = Token(TokenKind.NOSECRET, bytes(range(0xA0, 0xC0)))  # its id has hex letters
    corrupt = first.encode()[:-5] + ("a" if first.encode()[-5] != "a" else "b") + first.encode()[-4:]
    log = "\r\n".join([
        "[    0.000000] Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)",
        f"[    0.000000] Command line: console=ttyS0 imprint.token={shared.encode()}",
        "\x1b[0;32m  OK  \x1b[0m Started imprint-agent.service.",
        "IMPRINT-VM-TOKEN",  # the prefix alone
        "IMPRINT-VM-TOKEN ",  # the prefix and nothing after it
        f"IMPRINT-VM-TOKEN {shared.encode()}",  # not a VM token: never announced as one
        f"IMPRINT-VM-TOKEN {corrupt}",  # garbled on the serial line: skipped
        f"IMPRINT-VM-TOKEN{first.encode()}",  # no separating space
        tokens.vm_token_line(first, answers=owner),
        # Not the agent's line, even though they carry a valid token: in the middle of a line
        # (journald's forwarding prefix, a log line quoting a peer), in another case, with words
        # around it, or after a carriage return a terminal would show over the line's start.
        f"[    7.123456] imprint-agent[412]: IMPRINT-VM-TOKEN {second.encode()}",
        f"imprint-agent: peer said: {tokens.vm_token_line(second, answers=owner)}",
        "random noise \x00\xff IMPRINT-VM-TOKEN-ish",
        f"IMPRINT-VM-TOKEN   {second.encode().upper()}   trailing words",
        f"IMPRINT-VM-TOKEN {second.encode().upper()}",
        f"{tokens.vm_token_line(second, answers=owner)} trailing words",
        f"login: \r{tokens.vm_token_line(second, answers=owner)}",
        f"{tokens.vm_token_line(second, answers=owner)}\rlogin: ",
        f"IMPRINT-VM-TOKEN {second.encode()} for {owner.token_id.hex().upper()}",
        f"IMPRINT-VM-TOKEN {second.encode()} for {owner.token_id.hex()[:-1]}",
        "",
    ])
    assert tokens.find_vm_token_lines(log) == [first]
    assert tokens.find_vm_token_announcements(log) == [tokens.Announcement(first, owner.token_id.hex())]


def test_find_vm_token_lines_reads_what_vm_token_line_writes() -> None:
    token = Token(TokenKind.VM, K)
    owner = Token(TokenKind.NOSECRET, bytes(range(32)))
    line = tokens.vm_token_line(token, answers=owner)
    assert line == f"IMPRINT-VM-TOKEN {token.encode()} for {owner.token_id.hex()}"
    assert tokens.find_vm_token_lines(line) == [token]
    assert tokens.find_vm_token_lines(f"\n{line}\r\n") == [token]  # as the agent frames it on a tty
    # The form of agents before issue 9, without the owner token id, is still read.
    assert tokens.find_vm_token_announcements(tokens.vm_token_line(token)) == [tokens.Announcement(token, None)]
    assert tokens.find_vm_token_lines("nothing here\n") == []
    with pytest.raises(TokenError):
        tokens.vm_token_line(owner)  # only a VM token is ever announced
