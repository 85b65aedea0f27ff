"""cloud-init instance data: whatever datasource cloud-init found becomes a channel.

cloud-init (22.4, Debian 12) writes ``/run/cloud-init/instance-data-sensitive.json`` on every
boot (``DataSource.persist_instance_data``): ``ds`` holds the datasource's metadata, ``v1`` a
fixed set of standard keys, ``merged_cfg`` the system config. The key ``imprint-token`` is
looked for in these places (key paths written the way cloud-init writes them in
``base64_encoded_keys``):

- ``ds/meta_data/imprint-token``: NoCloud ``meta-data`` (``imprint-token: ...``), and the
  metadata of the datasources that keep it flat;
- ``ds/meta_data/meta/imprint-token``: OpenStack and ConfigDrive user metadata
  (``openstack server create --property imprint-token=...``);
- ``ds/meta-data/tags/instance/imprint-token``: EC2, whose crawled metadata tree is kept as is
  (an instance tag, with tags allowed in instance metadata);
- the top-level ``imprint-token:`` of ``#cloud-config`` user-data, which every datasource
  carries. cloud-init leaves user-data out of the instance data and stores it raw in
  ``/var/lib/cloud/instances/<instance id>/user-data.txt``; the instance id comes from this
  boot's instance data, so user-data left over from an earlier instance (an image made from a
  booted VM) is never read. Gzipped, MIME multi-part and Jinja-templated user-data are not
  searched: that needs cloud-init's own parser; put the token in metadata instead.

The owner addresses are the key ``imprint-owner`` in those same places (a string in the list
form, or a list of address strings where the place is JSON; in ``#cloud-config`` a one-line
string: quote it when it starts with ``[``). They belong to the token: every place that gives
them must give the same list, and owner addresses with no token anywhere make the channel broken.

``v1`` is not searched (a fixed set of standard keys, never user keys), nor ``merged_cfg``
(/etc/cloud configuration, the same on every VM made from an image: no place for a token).

The file missing, or present without the key, is *absent*; invalid JSON (which includes a
document nested deeper than the bound, a duplicate key, or a NUL in a string: see
:func:`imprint.boundedio.load_json`), an instance id that cannot name a directory, or a corrupt
token is *broken*. cloud-init writes the file in place (truncate, then write), so an empty file, or
invalid JSON that changes when read again a moment later, is a file being written: absent for
this poll. Two places carrying different tokens are broken.

``cloud-init query`` is not used as a fallback: it reads this same file (and fails without
it), and starting cloud-init's Python costs seconds at boot under emulation.

Note that cloud-init also writes the world-readable ``instance-data.json``, redacting only
``merged_cfg`` and ``security-credentials``: a token in metadata is readable by every user of
the VM, like one on the kernel command line.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imprint import boundedio, tokens
from imprint.channels.channel import (
    OWNER_KEY,
    TOKEN_KEY,
    Channel,
    ChannelBroken,
    Offer,
    Owners,
    agreeing,
    load_json,
    offer,
    parse_owners,
    parse_token,
    read_bounded,
)
from imprint.guest.distro import Distro
from imprint.owneraddr import encode_list
from imprint.safetext import printable

NAME = "cloud-init"
KEY = TOKEN_KEY

# Where the key may sit in the instance data, in order (see the module docstring).
LOCATIONS: tuple[tuple[str, ...], ...] = (
    ("ds", "meta_data"),
    ("ds", "meta_data", "meta"),
    ("ds", "meta-data", "tags", "instance"),
)

# Instance data is a few KiB to a few hundred (EC2's crawled tree, network config); this bound
# only stops a runaway file.
MAX_INSTANCE_DATA = 4 * 1024 * 1024
# A user-data line longer than this is skipped (it is not the token's line).
MAX_LINE = 64 * 1024
# #cloud-config user-data is at most 16 KiB on EC2, 64 KiB on OpenStack and Azure, 256 KiB on GCE.
# Only a #cloud-config file is read past its first line (gzipped user-data may be larger).
MAX_USER_DATA = 4 * 1024 * 1024
# The instance id names a directory (NAME_MAX).
MAX_INSTANCE_ID = 255
# How long to wait before reading an invalid file again, to tell "being written" from corrupt
# (the default of read()'s reread_pause; its sleep waits it, a test acts during it instead).
REREAD_PAUSE = 0.2

_BLOCK_SCALARS = {"|", "|-", "|+", ">", ">-", ">+"}


def _read_bytes(path: Path) -> bytes | None:
    return read_bounded(NAME, path, MAX_INSTANCE_DATA)


def _load(path: Path, reread_pause: float, sleep: Callable[[float], None]) -> dict[str, Any] | None:
    raw = _read_bytes(path)
    if raw is None or not raw.strip():
        return None
    try:
        data = load_json(NAME, raw, path, MAX_INSTANCE_DATA)
    except ChannelBroken:
        sleep(reread_pause)
        if _read_bytes(path) != raw:
            return None  # cloud-init is writing it; the next poll reads the whole file
        raise
    if not isinstance(data, dict):
        raise ChannelBroken(NAME, f"{path}: the JSON is not an object")
    return data


def _metadata_values(path: Path, data: dict[str, Any], key: str) -> list[tuple[str, object]]:
    """(where, value) of ``key`` in each of LOCATIONS that has it, base64 values decoded."""
    encoded = data.get("base64_encoded_keys")
    encoded_keys = set(encoded) if isinstance(encoded, list) else set()
    found: list[tuple[str, object]] = []
    for location in LOCATIONS:
        node: Any = data
        for step in location:
            node = node.get(step) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        key_path = "/".join((*location, key))
        where = f"{path} {key_path}"
        value = node[key]
        if key_path in encoded_keys and isinstance(value, str):
            # cloud-init stored a binary value base64-encoded (its "ci-b64:" convention).
            try:
                value = base64.b64decode(value, validate=True).decode("ascii")
            except (binascii.Error, UnicodeDecodeError):
                raise ChannelBroken(NAME, f"{where}: base64-encoded value is not ASCII text") from None
        found.append((where, value))
    return found


def _metadata_tokens(path: Path, data: dict[str, Any]) -> list[tuple[str, tokens.Token]]:
    found = []
    for where, value in _metadata_values(path, data, KEY):
        if not isinstance(value, str):
            raise ChannelBroken(NAME, f"{where} is {type(value).__name__}, not a token string")
        found.append((where, parse_token(NAME, value, where)))
    return found


def _metadata_owners(path: Path, data: dict[str, Any]) -> list[tuple[str, Owners]]:
    return [(where, parse_owners(NAME, value, where)) for where, value in _metadata_values(path, data, OWNER_KEY)]


def _scalar(rest: str) -> str:
    """The value after ``key:`` on one line: plain (maybe with a comment) or quoted."""
    value = rest.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        return value[1:end] if end > 0 else value[1:]
    return value.split(" #", 1)[0].strip()


def _user_data_lines(path: Path) -> Iterator[bytes]:
    """The lines of a ``#cloud-config`` user-data file, after its header; nothing for other
    formats. The file is read bounded, and never blocks (a FIFO is refused)."""
    try:
        fd = boundedio.open_checked(path)
    except boundedio.InputError as exc:
        raise ChannelBroken(NAME, str(exc)) from None
    if fd is None:
        return
    with os.fdopen(fd, "rb") as handle:
        header = handle.readline(MAX_LINE)
        # "#cloud-config-archive" and "#cloud-config-jsonp" are other formats.
        if not header.startswith(b"#cloud-config") or header.startswith(b"#cloud-config-"):
            return
        try:
            rest = handle.read(MAX_USER_DATA + 1)
        except OSError as exc:
            raise ChannelBroken(NAME, f"cannot read {path}: {exc.strerror}") from None
    if len(rest) > MAX_USER_DATA:
        raise ChannelBroken(NAME, f"{path} is larger than {MAX_USER_DATA} bytes: too large for #cloud-config user-data")
    yield header
    lines = io.BytesIO(rest)
    yield from iter(lambda: lines.readline(MAX_LINE), b"")


def _user_data_values(path: Path) -> dict[str, list[str]]:
    """Every top-level ``imprint-token:`` and ``imprint-owner:`` value in a ``#cloud-config``
    file, by key (a tiny line reader: PyYAML is not loaded at agent start, and each value is one
    plain scalar)."""
    values: dict[str, list[str]] = {KEY: [], OWNER_KEY: []}
    lines = _user_data_lines(path)
    header = next(lines, None)
    if header is None:
        return values
    block: str | None = None  # the key whose value is a block scalar: it is on the next indented line
    whole = header.endswith(b"\n")  # the previous read ended its line
    for raw in lines:
        starts_line, whole = whole, raw.endswith(b"\n")
        if not starts_line or (not whole and len(raw) >= MAX_LINE):
            continue  # part of an overlong line
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            named = block or next((k for k in values if raw.startswith(k.encode())), None)
            if named is not None:
                raise ChannelBroken(NAME, f"{path}: the {named} line is not UTF-8 text") from None
            continue
        if block is not None and line.strip() and not line.startswith("#"):
            key, block = block, None
            if line[0] in " \t":
                values[key].append(line.strip())
                continue
            values[key].append("")  # an empty block: this line is the next key
        if not line or line[0] in " \t#":
            continue  # nested, a comment, or blank: not a top-level key
        key, sep, rest = line.partition(":")
        key = key.strip().strip("'\"")
        if not sep or key not in values or (rest and rest[0] not in " \t"):
            continue
        if rest.strip() in _BLOCK_SCALARS:
            block = key
            continue
        values[key].append(_scalar(rest))
    if block is not None:
        values[block].append("")
    return values


def _instance_id(path: Path, data: dict[str, Any]) -> str | None:
    """This boot's instance id, which names the directory of its user-data; None without one."""
    v1 = data.get("v1")
    instance_id = v1.get("instance_id") if isinstance(v1, dict) else None
    if not isinstance(instance_id, str) or instance_id in ("", ".", ".."):
        return None
    if not instance_id.isprintable() or len(instance_id.encode("utf-8", "replace")) > MAX_INSTANCE_ID:
        raise ChannelBroken(NAME, f"{path} v1/instance_id {printable(instance_id, 80)} cannot name a directory "
                                  f"(control characters, or longer than {MAX_INSTANCE_ID} bytes)")
    return instance_id


def _user_data(paths: Distro, data: dict[str, Any]
               ) -> tuple[list[tuple[str, tokens.Token]], list[tuple[str, Owners]]]:
    """The token and the owner addresses of this instance's #cloud-config user-data."""
    instance_id = _instance_id(paths.cloud_init_instance_data, data)
    if instance_id is None:
        return [], []
    path = paths.cloud_init_user_data(instance_id)
    values = _user_data_values(path)

    def one(key: str) -> tuple[str, str] | None:
        where = f"{path} (#cloud-config {key})"
        if len(set(values[key])) > 1:
            raise ChannelBroken(NAME, f"{where} is given {len(values[key])} times with different values")
        return (where, values[key][0]) if values[key] else None

    token, owners = one(KEY), one(OWNER_KEY)
    return ([(token[0], parse_token(NAME, token[1], token[0]))] if token else [],
            [(owners[0], parse_owners(NAME, owners[1], owners[0]))] if owners else [])


def read(paths: Distro, *, reread_pause: float = REREAD_PAUSE,
         sleep: Callable[[float], None] = time.sleep) -> Offer | None:
    path = paths.cloud_init_instance_data
    data = _load(path, reread_pause, sleep)
    if data is None:
        return None
    user_tokens, user_owners = _user_data(paths, data)
    found = _metadata_tokens(path, data) + user_tokens
    owners_found = _metadata_owners(path, data) + user_owners

    def refuse(first_where: str, first: tokens.Token, where: str, token: tokens.Token) -> ChannelBroken:
        return ChannelBroken(NAME, f"{first_where} and {where} carry different tokens "
                                   f"({first.token_id.hex()}, {token.token_id.hex()})")

    def refuse_owners(first_where: str, first: Owners, where: str, owners: Owners) -> ChannelBroken:
        return ChannelBroken(NAME, f"{first_where} and {where} carry different owner addresses "
                                   f"({encode_list(first)}; {encode_list(owners)})")

    agreed = agreeing(found, refuse)
    agreed_owners = agreeing(owners_found, refuse_owners)
    where, owners = agreed_owners if agreed_owners is not None else ("", ())
    return offer(NAME, None if agreed is None else agreed[1], owners, where)


# No site artefact of its own: cloud-init's datasource is fed by the nocloud or config-2 seed, or
# by the cloud's metadata.
CHANNEL = Channel(NAME, read)
