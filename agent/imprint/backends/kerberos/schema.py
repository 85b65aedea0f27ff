"""The kerberos backend's configuration as the agent receives it (built by the owner half from
the profile's table), checked by both sides."""

from __future__ import annotations

from imprint.backends.kerberos.keytab import PRINCIPAL_RE, REALM_RE
from imprint.backends.schema import Bool, List, Obj, Str

MAX_PRINCIPALS = 64
SCHEMA = Obj({
    "principals": List(Str(pattern=PRINCIPAL_RE, what="a principal (name/host@REALM)"), max_items=MAX_PRINCIPALS),
    "keytab": Str(),        # base64 of an MIT keytab
    "keytab_path": Str(),
    "krb5_conf": Obj({
        "realm": Str(required=True, pattern=REALM_RE, what="a realm name"),
        "kdc": List(Str(), max_items=16),
        "admin_server": Str(),
        "default_realm": Bool(),
        "domain_realm": List(Str(), max_items=64),
    }),
})
