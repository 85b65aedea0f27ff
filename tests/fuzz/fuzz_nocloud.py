"""The NoCloud meta-data YAML subset (imprint.channels.nocloud.meta_data_value), and a whole
NoCloud seed read from a volume holding the input as meta-data.

Only MetaDataError (SeedFault for the volume, or ChannelBroken for a value that is not a token)
may leave. A value read is one line. When the value
is a valid token, YAML itself (PyYAML, what cloud-init uses) must read the same value, if it
reads the document at all: the subset may refuse what YAML takes, never read something else.
"""

from __future__ import annotations

from typing import Any

from imprint import tokens
from imprint.channels import nocloud
from imprint.channels._volume import SeedFault
from imprint.channels.channel import ChannelBroken

KEY = "imprint-token"
FLAGS = ["-max_len=4096"]


class _Volume:
    def __init__(self, meta_data: bytes, token_file: bytes | None) -> None:
        self._files = {nocloud.META_DATA: meta_data, nocloud.TOKEN_FILE: token_file}

    def read(self, path: str, limit: int = 64 * 1024) -> bytes | None:
        return self._files.get(path)


def _yaml_value(text: str) -> Any:
    import yaml  # only on the rare path: not instrumented, and not loaded for every input

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError:
        return ...
    return document.get(KEY) if isinstance(document, dict) else ...


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        value = nocloud.meta_data_value(text, KEY)
    except nocloud.MetaDataError:
        value = None
    if value is not None:
        assert "\n" not in value and "\r" not in value
        try:
            tokens.parse(value)
        except tokens.TokenError:
            pass
        else:
            seen = _yaml_value(text.lstrip("\ufeff"))
            assert seen is ... or seen == value, f"the subset read {value!r}, YAML reads {seen!r}"
    meta, _, token_file = data.partition(b"\n\0imprint\0\n")
    try:
        nocloud._read_volume(_Volume(meta, token_file or None))  # type: ignore[arg-type]
    except (SeedFault, ChannelBroken):
        pass
