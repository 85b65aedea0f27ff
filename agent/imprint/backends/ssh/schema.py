"""The ssh backend's configuration as the agent receives it, checked by both sides (the owner's
profile table is turned into it by imprint.backends.ssh.owner), and the limits both halves share."""

from __future__ import annotations

from imprint.backends import USER_NAME_RE
from imprint.backends.schema import Bool, List, Obj, Str

MAX_USERS = 100
HOST_KEY_TYPES = frozenset({"ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                            "ecdsa-sha2-nistp521"})
USER_NAME = Str(required=True, pattern=USER_NAME_RE,
                what="a user name (lower-case letters, digits, '_', '-'; starting with a letter or '_'; at most 32)")
USER = Obj({"name": USER_NAME, "authorized_keys": List(Str(), max_items=1000), "sudo": Bool(), "shell": Str()},
           label="name")
USERS = List(USER, max_items=MAX_USERS)
SCHEMA = Obj({
    "users": USERS,
    "trusted_user_ca_keys": List(Str(), max_items=16),
    "host_certificates": List(Str(), max_items=16),
    "reload_command": List(Str(), max_items=64),
})
