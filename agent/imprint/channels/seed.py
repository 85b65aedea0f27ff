"""imprint's own seed: a small ISO9660 or vfat filesystem labelled ``IMPRINT`` whose file
``token`` holds the token on one line (``imprint-site seed --channel imprint-seed-iso`` or
``imprint-seed-vfat`` builds one).

The owner addresses are the file ``owner`` beside it (the list form: comma- or
newline-separated; the site writes one address per line). ``owner`` without ``token`` is broken.

A volume labelled IMPRINT is imprint's by definition, so a missing or unreadable ``token`` file
is a broken channel, not an absent one.

Consuming (shared mode, after a bind): on a writable vfat seed the file's clusters are zeroed
in place and ``token`` is replaced by the marker line ``imprint-consumed``; a later read reports
the seed as consumed. An ISO9660 seed is read-only and keeps K: the site should detach it.
"""

from __future__ import annotations

from imprint.channels._volume import Files, SeedFault, file_text, not_a_token, read_labelled, seed_artefacts
from imprint.channels.channel import Channel, Offer, Owners, encode_owners, parse_owners, parse_token
from imprint.guest import volumes
from imprint.guest.distro import Distro

NAME = "imprint-seed"
LABEL = "IMPRINT"
TOKEN_FILE = "/token"  # noqa: S105 (a file name, not a secret)
OWNER_FILE = "/owner"
CONSUMED_MARKER = b"imprint-consumed\n"


def _read_owners(volume: volumes.Volume) -> Owners:
    data = volume.read(OWNER_FILE)
    if data is None:
        return ()
    return parse_owners(NAME, file_text(data, "owner file"), "owner file")


def _read_volume(volume: volumes.Volume) -> Offer | None:
    owners = _read_owners(volume)
    data = volume.read(TOKEN_FILE)
    if data is None:
        raise SeedFault("the seed has an owner file but no token file" if owners else "the seed has no token file")
    if data.strip() == CONSUMED_MARKER.strip():
        raise SeedFault("its token was consumed by an earlier bind (the seed says so)")
    if data and not data.strip(b"\0"):
        # What a wipe interrupted between zeroing and rewriting leaves behind.
        raise SeedFault("its token file holds only zero bytes (a wipe was interrupted)")
    return Offer(parse_token(NAME, file_text(data, "token file"), not_a_token("token file")), owners)


def read(paths: Distro) -> Offer | None:
    return read_labelled(NAME, paths, (LABEL,), _read_volume)


def consume(paths: Distro) -> bool:
    """Wipe K from a writable vfat seed; False when there is none (absent, ISO, read-only).

    Errors are raised as OSError, which the caller logs: the bind has already happened.
    """
    link = paths.by_label(LABEL)
    if not link.exists():
        return False
    device = link.resolve()
    try:
        if volumes.detect(device) is not volumes.Kind.VFAT or not volumes.writable(device):
            return False
        volumes.wipe_file(device, TOKEN_FILE, CONSUMED_MARKER, paths.programs)
    except volumes.VolumeError as exc:
        raise OSError(f"cannot wipe K from the {LABEL} seed on {device}: {exc}") from None
    return True


def files(token: str, owners: Owners = ()) -> Files:
    made = {TOKEN_FILE: f"{token}\n".encode()}
    if owners:
        # One address per line; encoding the list first holds the list's rules (count, duplicates).
        made[OWNER_FILE] = (encode_owners(owners).replace(",", "\n") + "\n").encode()
    return made


CHANNEL = Channel(NAME, read, consume=consume, artefacts=seed_artefacts(
    NAME, LABEL, LABEL, files,
    iso_note="the guest reads the file token; an ISO is read-only, so K stays on it after the bind: detach it",
    vfat_note="the guest reads the file token and, in shared mode, wipes K from it after the bind (attached writable)",
    vfat_writable=True))
