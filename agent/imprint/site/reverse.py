"""``imprint-site reverse``: the VM token from a console log or a metadata disk's reply area."""

from __future__ import annotations

from pathlib import Path

from imprint import metadisk, tokens


class ReverseError(Exception):
    """No VM token could be extracted (the message says why)."""


def extract(path: Path) -> tokens.Token:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReverseError(f"cannot read {path}: {exc.strerror}") from None
    if data.startswith(metadisk.MAGIC):
        try:
            header = metadisk.decode_header(data)
            payload = metadisk.decode_reply(data[header.reply_offset : header.reply_offset + header.reply_size])
        except metadisk.MetadiskError as exc:
            raise ReverseError(f"{path}: metadata disk: {exc}") from None
        if payload is None:
            raise ReverseError(f"{path}: the VM has not written its VM token to the reply area yet")
        text = payload
    else:
        text = data.decode("utf-8", "replace")
    found = tokens.find_vm_token_lines(text)
    if not found:
        raise ReverseError(f"{path}: no '{tokens.VM_TOKEN_LINE_PREFIX} <token>' line with a valid VM token")
    distinct = {t.payload for t in found}
    if len(distinct) > 1:
        raise ReverseError(f"{path}: {len(distinct)} different VM tokens announced; refusing to guess")
    return found[-1]
