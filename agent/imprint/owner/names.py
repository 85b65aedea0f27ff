"""What the owner accepts as a VM's name and a VM's address: the CLI's arguments, the lines of
``imprint bind --from`` and the owner API check them here, once, before any of them reaches
the store, a socket or a terminal."""

from __future__ import annotations

import ipaddress

from imprint.owner.errors import UsageError

MAX_NAME = 64
MAX_HOST = 253


def valid_vm_name(name: str) -> str:
    """``name`` when it is 1-64 letters, digits, '-', '_' or '.', not starting with - or .
    (ASCII only: a name is shown on terminals, used in file names and SQL keys)."""
    if (not name or len(name) > MAX_NAME or not name.isascii()
            or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-."):
        raise UsageError(f"VM name {name[:80]!r} must be 1-64 letters, digits, '-', '_' or '.', "
                         "not starting with - or .")
    return name


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (a DNS name, an IPv4 literal or a bracketed IPv6 literal) as (host, port)."""
    shown = repr(address[:80])
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise UsageError(f"address {shown} is not HOST:PORT")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"address {shown}: port {port_text[:20]!r} is not a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise UsageError(f"address {shown}: {host[:80]!r} is not an IPv6 address") from None
        return host[1:-1], int(port_text)
    if ":" in host:  # unbracketed IPv6 (the last colon is the port's): accepted as it always was
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"address {shown}: {host[:80]!r} is not an IPv6 address") from None
        return host, int(port_text)
    labels = host.split(".")
    if (len(host) > MAX_HOST or not host.isascii()
            or not all(label and len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
                       and label[0] != "-" and label[-1] != "-" for label in labels)):
        raise UsageError(f"address {shown}: {host[:80]!r} is not a host name or an IPv4 address")
    return host, int(port_text)
