"""What both halves of the x509 backend check: the configuration the agent receives (built by
the owner half), the DNS names a certificate may carry and the size of a PEM document."""

from __future__ import annotations

import re

from imprint.backends.schema import Bool, List, Obj, Str

DNS_RE = re.compile(r"^(?=.{1,253}\Z)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")
MAX_PEM = 64 * 1024
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
SCHEMA = Obj({
    "key_path": Str(), "cert_path": Str(), "chain_path": Str(), "fullchain_path": Str(),
    "key_type": Str(choices=KEY_TYPES),
    "dns_names": List(Str(pattern=DNS_RE, what="a DNS name"), max_items=100),
    "include_addresses": Bool(),
    "interfaces": List(Str(), max_items=64),
    "allowed_addresses": List(Str(), max_items=256),
    "certificate": Str(),
    "chain": List(Str(), max_items=8),
    "reload_command": List(Str(), max_items=64),
})
