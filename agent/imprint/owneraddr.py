"""Owner addresses: where a VM dials its owner, given by the site beside the token.

The text form is ``HOST:PORT``, the host a DNS name (LDH labels), an IPv4 literal, or an IPv6
literal in brackets (``[2001:db8::1]:7444``); a list is comma-separated (newline-separated too,
for files). The port is always explicit.

An address is not secret and not trusted (the protocol authenticates whoever answers), but it
is hostile input: a site may write anything there, and the agent prints and dials it. So the
grammar is narrow and refuses rather than repairs: no userinfo, paths, zone ids, spaces,
controls or non-ASCII (IDNA names arrive as their ``xn--`` form), and every length is bounded
before any pattern is matched. An error quotes at most a short, printable excerpt.

Cheap to import (the agent imports it at boot): the standard library's ipaddress and re only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from imprint.safetext import printable

MAX_ADDRESSES = 8
# The longest address: a 253-character name, a colon and five digits; a little room beyond.
MAX_ADDRESS_TEXT = 300
# A whole list (eight of the longest, their separators, whitespace around them).
MAX_LIST_TEXT = 4096
MAX_NAME = 253
_EXCERPT = 60
_DIGITS = frozenset("0123456789")
_IPV6_CHARACTERS = frozenset("0123456789abcdefABCDEF:.")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Item separators in a list; whitespace around an item (never inside one) is allowed.
_SEPARATOR = re.compile(r"[,\n]")
_AROUND = " \t\r"


class OwnerAddressError(ValueError):
    """Not an owner address (or list); the message names the fault."""


def _quote(text: str) -> str:
    return printable(repr(text) if len(text) <= _EXCERPT else repr(text[:_EXCERPT]) + "...", _EXCERPT + 16)


def _fail(fault: str, text: str) -> OwnerAddressError:
    return OwnerAddressError(f"{fault}: {_quote(text)}")


def _port(text: str, whole: str) -> int:
    if not text:
        raise _fail("owner address has no port (HOST:PORT)", whole)
    # Not str.isdigit(): that takes fullwidth and Arabic-Indic digits, which int() would accept too.
    if len(text) > 5 or not set(text) <= _DIGITS:
        raise _fail("owner address port is not a decimal number 1..65535", whole)
    if text[0] == "0":
        raise _fail("owner address port is 0 or has a leading zero", whole)
    port = int(text)
    if port > 65535:
        raise _fail("owner address port is out of range (1..65535)", whole)
    return port


def _ipv6(text: str, whole: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise _fail("owner address has brackets around something that is not an IPv6 address", whole) from None


def _name_or_ipv4(text: str, whole: str) -> str:
    """The canonical form of a host written without brackets."""
    if not text:
        raise _fail("owner address has no host", whole)
    if ":" in text:
        if set(text) <= _IPV6_CHARACTERS:
            raise _fail("owner address is an IPv6 address without brackets (write [ADDRESS]:PORT)", whole)
        raise _fail("owner address has more than one ':' (HOST:PORT)", whole)
    if set(text) <= _DIGITS | {"."}:
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise _fail("owner address is not a valid IPv4 address", whole) from None
    name = text.lower()
    if len(name) > MAX_NAME:
        raise _fail(f"owner address host name is longer than {MAX_NAME} characters", whole)
    labels = name.split(".")
    for label in labels:
        if "_" in label:
            raise _fail("owner address host name has an underscore (not a host name)", whole)
        if _LABEL.fullmatch(label) is None:
            raise _fail("owner address host name is not dot-separated labels of letters, digits and inner "
                        "hyphens (1-63 characters each)", whole)
    if set(labels[-1]) <= _DIGITS:
        # 1.2.3.999 or a.123: not a name (a numeric top label reads as an IPv4 address).
        raise _fail("owner address host name ends in a numeric label", whole)
    return name


def _canonical_host(host: str) -> str:
    """The canonical form of a host as :class:`OwnerAddress` stores it (IPv6 without brackets)."""
    if ":" in host:
        return _ipv6(host, host)
    return _name_or_ipv4(host, host)


@dataclass(frozen=True, order=True)
class OwnerAddress:
    host: str  # lower-cased DNS name, IPv4 literal, or IPv6 literal without brackets (compressed)
    port: int

    def __post_init__(self) -> None:
        # Built directly (not by parse) it must still be an address parse would give.
        if not isinstance(self.host, str) or not isinstance(self.port, int) or isinstance(self.port, bool):
            raise OwnerAddressError("owner address: host must be text and port an integer")
        if len(self.host) > MAX_ADDRESS_TEXT or not self.host.isascii() or not self.host.isprintable() \
                or any(c in self.host for c in " %@/[]"):
            raise _fail("owner address host is not a host name or an IP address", self.host)
        if _canonical_host(self.host) != self.host:
            raise _fail("owner address host is not in canonical form", self.host)
        if not 1 <= self.port <= 65535:
            raise OwnerAddressError(f"owner address port {self.port} is out of range (1..65535)")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse(text: str) -> OwnerAddress:
    """One owner address ``HOST:PORT``; OwnerAddressError naming the fault otherwise."""
    if not isinstance(text, str):
        raise OwnerAddressError("owner address is not text")
    if len(text) > MAX_ADDRESS_TEXT:
        raise _fail(f"owner address is longer than {MAX_ADDRESS_TEXT} characters", text)
    if not text:
        raise OwnerAddressError("owner address is empty")
    if not text.isascii() or not text.isprintable():
        raise _fail("owner address has control or non-ASCII characters", text)
    for char, fault in ((" ", "a space"), ("@", "userinfo ('@')"), ("/", "a path ('/')"),
                        ("%", "a zone id ('%')"), (",", "a comma (one address expected)")):
        if char in text:
            raise _fail(f"owner address has {fault}", text)
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _fail("owner address has '[' without ']'", text)
        if text[close + 1 : close + 2] != ":":
            raise _fail("owner address has no port after its bracketed IPv6 address ([ADDRESS]:PORT)", text)
        host = _ipv6(text[1:close], text)
        port_text = text[close + 2 :]
    else:
        if "[" in text or "]" in text:
            raise _fail("owner address has brackets in the wrong place", text)
        if ":" not in text:
            raise _fail("owner address has no port (HOST:PORT)", text)
        host_text, _, port_text = text.rpartition(":")
        host = _name_or_ipv4(host_text, text)
    return OwnerAddress(host, _port(port_text, text))


def parse_list(text: str) -> tuple[OwnerAddress, ...]:
    """A comma- (or newline-) separated list of owner addresses, duplicates dropped (the first
    kept, order kept); empty, overlong, or more than MAX_ADDRESSES items refused."""
    if not isinstance(text, str):
        raise OwnerAddressError("owner address list is not text")
    if len(text) > MAX_LIST_TEXT:
        raise _fail(f"owner address list is longer than {MAX_LIST_TEXT} characters", text)
    # A file ends in a newline; blanks around the list are not an item.
    body = text.strip(_AROUND + "\n")
    if not body:
        raise OwnerAddressError("owner address list is empty")
    items = [item.strip(_AROUND) for item in _SEPARATOR.split(body)]
    if len(items) > MAX_ADDRESSES:
        raise OwnerAddressError(f"owner address list has {len(items)} items, more than {MAX_ADDRESSES}")
    addresses: list[OwnerAddress] = []
    for item in items:
        if not item:
            raise _fail("owner address list has an empty item", text)
        address = parse(item)
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def encode_list(addresses: Sequence[OwnerAddress]) -> str:
    """The canonical list form ``a:1,b:2`` (no spaces: it fits a kernel command line)."""
    if not addresses:
        raise OwnerAddressError("owner address list is empty")
    if len(addresses) > MAX_ADDRESSES:
        raise OwnerAddressError(f"owner address list has {len(addresses)} items, more than {MAX_ADDRESSES}")
    if not all(isinstance(address, OwnerAddress) for address in addresses):
        raise OwnerAddressError("owner address list holds something that is not an OwnerAddress")
    if len(set(addresses)) != len(addresses):
        raise OwnerAddressError("owner address list has duplicates")
    return ",".join(str(address) for address in addresses)
