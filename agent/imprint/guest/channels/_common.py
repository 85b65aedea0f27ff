"""Helpers shared by channel modules: bounded reads and token parsing, naming the channel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imprint import boundedio, tokens
from imprint.guest.channels import ChannelBroken

# A token file holds one short line; anything much larger is not a token file.
MAX_TOKEN_FILE = 4096


def parse_token(channel: str, text: str, where: str) -> tokens.Token:
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        raise ChannelBroken(channel, f"{where}: {exc}") from None


def read_bounded(channel: str, path: Path, limit: int, what: str = "") -> bytes | None:
    """At most ``limit`` bytes of the regular file ``path`` (not a link, never a FIFO: opened
    without blocking and checked); None when it does not exist; broken otherwise."""
    try:
        return boundedio.read_file(path, limit, what=what)
    except boundedio.InputError as exc:
        raise ChannelBroken(channel, str(exc)) from None


def load_json(channel: str, data: bytes, where: object, limit: int) -> Any:
    """A JSON document within ``limit`` bytes and the nesting bound; broken otherwise."""
    try:
        return boundedio.load_json(data, limit=limit)
    except boundedio.InputError as exc:
        raise ChannelBroken(channel, f"{where}: invalid JSON ({exc})") from None


def read_token_file(channel: str, path: Path) -> tokens.Token | None:
    """The token in a small text file; None when the file does not exist."""
    raw = read_bounded(channel, path, MAX_TOKEN_FILE, ": not a token file")
    if raw is None:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelBroken(channel, f"{path} is not ASCII text") from None
    return parse_token(channel, text, str(path))
