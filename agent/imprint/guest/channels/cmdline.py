"""Kernel command line: ``imprint.token=<token>`` in /proc/cmdline."""

from __future__ import annotations

from imprint import tokens
from imprint.guest.channels import ChannelBroken
from imprint.guest.paths import GuestPaths

PARAMETER = "imprint.token"


def read(paths: GuestPaths) -> tokens.Token | None:
    try:
        text = paths.cmdline.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChannelBroken("cmdline", f"cannot read {paths.cmdline}: {exc.strerror}") from None
    values = [word.partition("=")[2] for word in text.split() if word.partition("=")[0] == PARAMETER]
    if not values:
        return None
    if len(set(values)) > 1:
        raise ChannelBroken("cmdline", f"{PARAMETER} is given {len(values)} times with different values")
    try:
        return tokens.parse(values[0])
    except tokens.TokenError as exc:
        raise ChannelBroken("cmdline", f"{PARAMETER}: {exc}") from None
