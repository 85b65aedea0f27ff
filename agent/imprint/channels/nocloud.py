"""cloud-init NoCloud seed: an ISO9660 or vfat filesystem labelled ``cidata`` or ``CIDATA``.

The token is either the ``imprint-token`` key of ``meta-data``::

    instance-id: imprint-0123456789abcdef
    local-hostname: imprint-0123456789abcdef
    imprint-token: imprint1s-...

or the content of a file ``imprint`` at the root of the filesystem (which cloud-init ignores,
so K there does not end up in cloud-init's world-readable instance-data.json). When both are
given they must carry the same token. A seed with neither is someone else's: absent.

The owner addresses are the ``imprint-owner`` key of ``meta-data``, a string in the list form
(``imprint-owner: owner.example:7444,[2001:db8::1]:7444``; quote it when it starts with ``[``,
which YAML reads as a list). It belongs to the token on the same seed (in meta-data or the
``imprint`` file); without a token it makes the channel broken.

The site's ``nocloud-iso``/``nocloud-vfat`` artefact is a complete NoCloud seed (:func:`files`:
meta-data with the token, an empty ``#cloud-config`` user-data), so cloud-init boots from it too.

``meta-data`` is YAML. The agent must not need PyYAML (nor pay for importing it), so only the
subset a seed actually uses is read: top-level ``key: value`` lines with a plain, single- or
double-quoted value, comments, and a document that is a JSON object (JSON is YAML too). When
``imprint-token`` or ``imprint-owner`` is present in any other form (a block scalar, a value continued on the next
line, given twice) the channel is broken rather than guessing what a YAML parser would make of
it; other keys may use any YAML at all, since they are not read.
"""

from __future__ import annotations

import re

from imprint import boundedio
from imprint.channels._volume import (
    CLOUD_INIT_COPIES,
    Files,
    SeedFault,
    file_text,
    instance_name,
    not_a_token,
    read_labelled,
    seed_artefacts,
)
from imprint.channels.channel import (
    OWNER_KEY,
    TOKEN_KEY,
    Channel,
    Offer,
    Owners,
    encode_owners,
    offer,
    parse_owners,
    parse_token,
)
from imprint.guest import volumes
from imprint.guest.distro import Distro

NAME = "nocloud"
LABELS = ("cidata", "CIDATA")  # cloud-init looks for cidata and CIDATA
KEY = TOKEN_KEY
USER_DATA = "/user-data"
META_DATA = "/meta-data"
TOKEN_FILE = "/imprint"  # noqa: S105 (a file name, not a secret)

# A plain (unquoted) key ends at the first ":" that is followed by a space or the line's end.
# Found with a search, not a lazy match with a trailing [ \t]*: that backtracks quadratically
# over a long run of spaces (a 64 KiB line cost 12 s per poll).
_KEY_END = re.compile(r":(?=[ \t]|$)")
_NOT_PLAIN_START = set("#'\"{}[]&*!|>%@`?")
# Where a plain scalar's comment begins: the first "#" after a blank.
_COMMENT = re.compile(r"[ \t]#")


class MetaDataError(ValueError):
    """``imprint-token`` is in meta-data in a form this reader does not take."""


def _json_value(text: str, key: str) -> str | None:
    try:
        document = boundedio.load_json(text.encode("utf-8", "surrogatepass"), limit=volumes.MAX_FILE)
    except boundedio.JsonSyntaxError:
        # A YAML flow mapping ({a: b}) that is not JSON: fine unless it carries our key.
        if key in text:
            raise MetaDataError(f"{key} is inside a YAML flow mapping; write it as a '{key}: <token>' line") from None
        return None
    except boundedio.InputError as exc:
        if key in text:
            raise MetaDataError(f"{key} is in a JSON document this reader refuses: {exc}") from None
        return None
    if not isinstance(document, dict):
        if key in text:
            raise MetaDataError(f"{key} is in a JSON document that is not an object") from None
        return None
    if key not in document:
        return None
    value = document[key]
    if not isinstance(value, str):
        raise MetaDataError(f"{key} is not a string")
    return value


def _split_key(line: str) -> tuple[str, str] | None:
    """(key, rest after the colon) of a top-level mapping line, or None."""
    if line[0] in "\"'":
        quote = line[0]
        end = line.find(quote, 1)
        if end < 0:
            return None
        after = line[end + 1 :].lstrip(" \t")
        if not after.startswith(":"):
            return None
        return line[1:end], after[1:]
    if line[0] in _NOT_PLAIN_START or line[0].isspace():
        return None
    colon = _KEY_END.search(line, 1)
    if colon is None or "#" in line[: colon.start()]:
        return None
    return line[: colon.start()].rstrip(" \t"), line[colon.end() :]


def _scalar(rest: str, key: str) -> str:
    """The value after ``key:`` on its line: plain, 'single' or "double" quoted."""
    value = rest.strip(" \t")
    if not value or value.startswith("#"):
        raise MetaDataError(f"{key} has no value on its line; write it as '{key}: <token>'")
    if value[0] == '"':
        end = value.find('"', 1)
        if end < 0 or "\\" in value[1:end]:
            raise MetaDataError(f"{key} is a double-quoted value this reader does not take (escapes or no end)")
        inner, tail = value[1:end], value[end + 1 :]
    elif value[0] == "'":
        match = re.match(r"'((?:[^']|'')*)'", value)
        if match is None:
            raise MetaDataError(f"{key} is a single-quoted value without its closing quote")
        inner, tail = match.group(1).replace("''", "'"), value[match.end() :]
    elif value[0] in "|>&*!{[@`%":
        raise MetaDataError(f"{key} is written in a YAML form this reader does not take; "
                            f"write it as '{key}: <token>'")
    else:
        # A plain scalar ends where a comment (" #") begins.
        comment = _COMMENT.search(value)
        inner, tail = (value if comment is None else value[: comment.start()]).rstrip(" \t"), ""
    if tail.strip(" \t") and not re.match(r"[ \t]+#", tail):
        raise MetaDataError(f"{key} has text after its quoted value")
    return inner


def meta_data_value(text: str, key: str) -> str | None:
    """The top-level string value of ``key`` in NoCloud meta-data; None when the key is not
    there. Raises MetaDataError when it is there in a form this subset does not read."""
    text = text.lstrip("\ufeff")
    if text.lstrip().startswith("{"):
        return _json_value(text, key)
    values: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if not line.strip() or line[0] in " \t#" or line.rstrip() in ("---", "...") or line[0] == "%":
            continue  # blank, nested under another key, comment, document markers, directives
        split = _split_key(line)
        if split is None:
            if key in line:
                raise MetaDataError(f"{key} is on a line this reader cannot split into 'key: value'")
            continue
        if split[0] != key:
            continue
        values.append(_scalar(split[1], key))
        # The next non-blank line (a loop, not a slice: a slice per key line is quadratic).
        following = next((lines[later] for later in range(number + 1, len(lines)) if lines[later].strip()), "")
        if following[:1] in (" ", "\t"):
            raise MetaDataError(f"{key} continues on the next line; write it on one line")
    if len(values) > 1:
        raise MetaDataError(f"{key} is given {len(values)} times")
    return values[0] if values else None


def _read_volume(volume: volumes.Volume) -> Offer | None:
    from_meta_data = None
    owners: Owners = ()
    meta_data = volume.read(META_DATA)
    if meta_data is not None:
        # Not ASCII-only: other keys may hold any text; the token itself is checked by parse.
        text = meta_data.decode("utf-8", "replace")
        try:
            value = meta_data_value(text, KEY)
            owner_value = meta_data_value(text, OWNER_KEY)
        except MetaDataError as exc:
            raise SeedFault(f"meta-data: {exc}") from None
        if owner_value is not None:
            owners = parse_owners(NAME, owner_value, f"meta-data: {OWNER_KEY}")
        if value is not None:
            from_meta_data = parse_token(NAME, value, not_a_token(f"meta-data: {KEY}"))
    raw = volume.read(TOKEN_FILE)
    what = "the imprint file"
    from_file = parse_token(NAME, file_text(raw, what), not_a_token(what)) if raw is not None else None
    if from_meta_data is not None and from_file is not None and from_meta_data != from_file:
        raise SeedFault(f"meta-data's {KEY} (token {from_meta_data.token_id.hex()}) and the imprint file "
                        f"(token {from_file.token_id.hex()}) disagree")
    return offer(NAME, from_meta_data or from_file, owners, f"meta-data: {OWNER_KEY}")


def read(paths: Distro) -> Offer | None:
    return read_labelled(NAME, paths, LABELS, _read_volume)


def files(token: str, owners: Owners = ()) -> Files:
    name = instance_name(token)
    meta_data = f"instance-id: {name}\nlocal-hostname: {name}\n{KEY}: {token}\n"
    if owners:
        # Quoted: a list starting with "[" (an IPv6 literal) would be a YAML flow sequence.
        meta_data += f"{OWNER_KEY}: '{encode_owners(owners)}'\n"
    # cloud-init requires user-data next to meta-data; an empty #cloud-config changes nothing.
    return {META_DATA: meta_data.encode(), USER_DATA: b"#cloud-config\n{}\n"}


_NOTE = f"cloud-init NoCloud seed; the guest reads meta-data key {KEY} ({CLOUD_INIT_COPIES})"

CHANNEL = Channel(NAME, read, artefacts=seed_artefacts(NAME, LABELS[0], LABELS[1], files,
                                                       iso_note=_NOTE, vfat_note=_NOTE))
