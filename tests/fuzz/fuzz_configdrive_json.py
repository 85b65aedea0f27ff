"""config-2 meta_data.json: the bounded JSON loader (imprint.boundedio.load_json) and the config-2
channel's reading of a volume holding the input (imprint.channels.configdrive).

Only InputError (SeedFault for the volume, or ChannelBroken for a value that is not a token)
may leave. The loader agrees with the standard library's parser: what it accepts parses to the
same document, and what the standard library refuses as not JSON it refuses too (it refuses
more: depth, duplicate keys, NUL, NaN).
"""

from __future__ import annotations

import json

from imprint import boundedio
from imprint.channels import configdrive
from imprint.channels._volume import SeedFault
from imprint.channels.channel import ChannelBroken

LIMIT = 64 * 1024
FLAGS = ["-max_len=8192"]


class _Volume:
    def __init__(self, content: bytes) -> None:
        self._content = content

    def read(self, path: str, limit: int = LIMIT) -> bytes | None:
        return self._content if path == configdrive.META_DATA else None


def _stdlib(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return ...


def test_one_input(data: bytes) -> None:
    try:
        document = boundedio.load_json(data, limit=LIMIT)
    except boundedio.InputError:
        document = ...
    if document is not ...:
        assert _stdlib(data) == document
    try:
        configdrive._read_volume(_Volume(data))  # type: ignore[arg-type]
    except (SeedFault, ChannelBroken):
        pass
