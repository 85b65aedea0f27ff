"""OpenStack config drive: an ISO9660 or vfat filesystem labelled ``config-2`` or ``CONFIG-2``.

The token is the ``imprint-token`` key of the instance's ``meta`` (``openstack server create
--config-drive true --property imprint-token=<token>``), in
``openstack/latest/meta_data.json``::

    {"uuid": "...", "hostname": "...", "meta": {"imprint-token": "imprint1s-..."}}

A config drive without the file, without ``meta`` or without the key is someone else's:
absent. Invalid JSON (nested deeper than the bound, duplicate keys or a NUL in a string count:
:func:`imprint.boundedio.load_json`), a ``meta`` that is not an object, or a key that is not a
valid token string make the channel broken.

The owner addresses are ``meta`` -> ``imprint-owner`` beside the token (``--property
imprint-owner=owner.example:7444,[2001:db8::1]:7444``): a string in the list form (OpenStack
metadata values are strings), or a JSON list of address strings. Without a token in ``meta``
it makes the channel broken.

The site's ``config-2-iso``/``config-2-vfat`` artefact is a config drive cloud-init accepts
(:func:`files`: a uuid, names, and the token and owner addresses in ``meta``).
"""

from __future__ import annotations

import json

from imprint import boundedio
from imprint.channels._volume import (
    CLOUD_INIT_COPIES,
    Files,
    SeedFault,
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

NAME = "config-2"
LABELS = ("config-2", "CONFIG-2")  # cloud-init and nova: config-2 (CONFIG-2 is read too)
KEY = TOKEN_KEY
META_DATA = "/openstack/latest/meta_data.json"
_WHAT = META_DATA.lstrip("/")
_UUID_NAMESPACE = "5b0c6a39-8f5e-4d0a-9a57-2b0f8d1f6c11"  # imprint's, for config-2 uuids


def _read_volume(volume: volumes.Volume) -> Offer | None:
    raw = volume.read(META_DATA)
    if raw is None:
        return None
    try:
        document = boundedio.load_json(raw, limit=volumes.MAX_FILE)
    except boundedio.InputError as exc:
        # The message gives a position or the rule broken, never the content.
        raise SeedFault(f"{_WHAT} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SeedFault(f"{_WHAT} is not a JSON object")
    if "meta" not in document:
        return None
    meta = document["meta"]
    if not isinstance(meta, dict):
        raise SeedFault(f"{_WHAT}: meta is not an object")
    owners = parse_owners(NAME, meta[OWNER_KEY], f"{_WHAT}: meta.{OWNER_KEY}") if OWNER_KEY in meta else ()
    token = None
    if KEY in meta:
        value = meta[KEY]
        if not isinstance(value, str):
            raise SeedFault(f"{_WHAT}: meta.{KEY} is not a string")
        token = parse_token(NAME, value, not_a_token(f"{_WHAT}: meta.{KEY}"))
    return offer(NAME, token, owners, f"{_WHAT}: meta.{OWNER_KEY}")


def read(paths: Distro) -> Offer | None:
    return read_labelled(NAME, paths, LABELS, _read_volume)


def files(token: str, owners: Owners = ()) -> Files:
    import uuid  # the site's only: not on the agent's start path

    name = instance_name(token)
    meta_data = {
        "uuid": str(uuid.uuid5(uuid.UUID(_UUID_NAMESPACE), name)),  # cloud-init requires it (its instance-id)
        "hostname": name,
        "name": name,
        "launch_index": 0,
        "meta": {KEY: token, **({OWNER_KEY: encode_owners(owners)} if owners else {})},
    }
    return {META_DATA: (json.dumps(meta_data, indent=2) + "\n").encode()}


_NOTE = f"OpenStack config drive; the guest reads meta.{KEY} ({CLOUD_INIT_COPIES})"

CHANNEL = Channel(NAME, read, artefacts=seed_artefacts(NAME, LABELS[0], LABELS[1], files,
                                                       iso_note=_NOTE, vfat_note=_NOTE))
