"""The owner side (``imprint``): identity, tokens, binding, pinned requests, and the record of it all.

The library is :class:`Owner` (owner/api.py; the CLI is a layer over it)::

    from imprint.owner import Owner, Unreachable

    with Owner("/srv/imprint") as owner:
        token = owner.new_token("web1", "nosecret")

Modules:

    api          the public owner API: Owner, its results and exceptions (exported here)
    cli          the command line: parses, calls the API, prints (exit codes in its docstring)
    home         the owner home and every file in it
    store        the SQLite record: VMs, tokens, pins, per-VM backend data, the append-only audit
    bind         one bind: the exchange over TLS, the pin, the check over the pinned channel
    client       the pinned mutual-TLS client of a bound VM
    apply        profiles: each table to its backend's owner half, rounds, the report
    fleet, progress   binding many VMs at once (``bind --from``, ``Owner.bind_many``) and what it shows
    names        what a VM name and a HOST:PORT may be
    errors, tlsfailures   the exceptions (one per exit code) and the one classification of a failed connection
"""

from imprint.owner.api import (
    AuditEntry,
    BackendFailed,
    Binding,
    Identity,
    IssuedToken,
    Owner,
    VmRecord,
    VmStatus,
)
from imprint.owner.errors import AuthenticationFailed, OwnerError, Unreachable, UsageError
from imprint.owner.fleet import FleetRequest, FleetResult, FleetSummary

__all__ = [
    "AuditEntry",
    "AuthenticationFailed",
    "BackendFailed",
    "Binding",
    "FleetRequest",
    "FleetResult",
    "FleetSummary",
    "Identity",
    "IssuedToken",
    "Owner",
    "OwnerError",
    "Unreachable",
    "UsageError",
    "VmRecord",
    "VmStatus",
]
