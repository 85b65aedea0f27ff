"""Helpers shared by channel modules: parse a token found on a channel, naming the channel."""

from __future__ import annotations

from pathlib import Path

from imprint import tokens
from imprint.guest.channels import ChannelBroken

# A token file holds one short line; anything much larger is not a token file.
MAX_TOKEN_FILE = 4096


def parse_token(channel: str, text: str, where: str) -> tokens.Token:
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        raise ChannelBroken(channel, f"{where}: {exc}") from None


def read_bounded(channel: str, path: Path, limit: int, what: str = "") -> bytes | None:
    """At most ``limit`` bytes of ``path``; None when it does not exist; broken when larger."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChannelBroken(channel, f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > limit:
        raise ChannelBroken(channel, f"{path} is larger than {limit} bytes{what}")
    return raw


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
