"""Boot channels the agent reads its token from, tried in one explicit order.

A channel reports one of three outcomes: the token it found, ``None`` when it is absent (try the
next channel), or it raises ChannelBroken (present but corrupt). Broken fails closed: the agent
never falls through from a broken channel to the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imprint.guest.paths import GuestPaths
from imprint.tokens import Token, TokenKind


class ChannelBroken(Exception):
    def __init__(self, channel: str, fault: str) -> None:
        super().__init__(f"boot channel {channel} is broken: {fault}")
        self.channel = channel
        self.fault = fault


@dataclass(frozen=True)
class Found:
    channel: str
    token: Token


Reader = Callable[[GuestPaths], Token | None]


def _registry() -> list[tuple[str, Reader]]:
    from imprint.guest.channels import cmdline

    return [("cmdline", cmdline.read)]


def channel_names() -> list[str]:
    return [name for name, _ in _registry()]


def find_token(paths: GuestPaths, only: list[str] | None = None) -> Found | None:
    """The token from the first present channel; None when every channel is absent."""
    for name, read in _registry():
        if only is not None and name not in only:
            continue
        token = read(paths)
        if token is None:
            continue
        if token.kind is TokenKind.VM:
            raise ChannelBroken(name, "it carries a VM token where the owner's token belongs")
        return Found(name, token)
    return None
