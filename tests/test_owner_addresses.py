"""Owner addresses (imprint.owneraddr): the forms taken, every refusal, and hostile input.

The text comes from a site, which may write anything: every fault is refused with a message
naming it, and the message quotes no more than a short, printable excerpt.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from imprint import owneraddr
from imprint.owneraddr import MAX_ADDRESSES, OwnerAddress, OwnerAddressError, encode_list, parse, parse_list


@pytest.mark.parametrize(("text", "host", "port", "canonical"), [
    ("owner.example:7444", "owner.example", 7444, "owner.example:7444"),
    ("Owner.EXAMPLE:7444", "owner.example", 7444, "owner.example:7444"),
    ("localhost:1", "localhost", 1, "localhost:1"),
    ("a-b.c-d.example:65535", "a-b.c-d.example", 65535, "a-b.c-d.example:65535"),
    ("xn--bcher-kva.example:443", "xn--bcher-kva.example", 443, "xn--bcher-kva.example:443"),
    ("1.example:80", "1.example", 80, "1.example:80"),
    ("192.0.2.7:7444", "192.0.2.7", 7444, "192.0.2.7:7444"),
    ("[2001:db8::1]:7444", "2001:db8::1", 7444, "[2001:db8::1]:7444"),
    ("[2001:DB8:0:0:0:0:0:1]:7444", "2001:db8::1", 7444, "[2001:db8::1]:7444"),
    ("[::1]:22", "::1", 22, "[::1]:22"),
    ("[::ffff:192.0.2.7]:1", "::ffff:c000:207", 1, "[::ffff:c000:207]:1"),
    (f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}:1", f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}", 1, None),
])
def test_good_forms(text: str, host: str, port: int, canonical: str | None) -> None:
    address = parse(text)
    assert address == OwnerAddress(host, port)
    assert str(address) == (canonical or text)
    assert parse(str(address)) == address


REFUSED = {
    "empty": ("", "empty"),
    "no port": ("owner.example", "no port"),
    "empty port": ("owner.example:", "no port"),
    "port zero": ("owner.example:0", "0 or has a leading zero"),
    "leading zero": ("owner.example:07444", "leading zero"),
    "port too big": ("owner.example:65536", "out of range"),
    "port huge": ("owner.example:99999999999999999999", "not a decimal number"),
    "port negative": ("owner.example:-1", "not a decimal number"),
    "port plus": ("owner.example:+80", "not a decimal number"),
    "port hex": ("owner.example:0x50", "not a decimal number"),
    "port name": ("owner.example:https", "not a decimal number"),
    "fullwidth digit": ("owner.example:\uff17444", "non-ASCII"),
    "arabic-indic digit": ("owner.example:\u0661\u0662", "non-ASCII"),
    "superscript digit": ("owner.example:\u00b9", "non-ASCII"),
    "escape": ("owner\x1b[31m.example:7444", "control"),
    "newline": ("owner.example:7444\nevil.example:1", "control"),
    "carriage return": ("owner.example\r:7444", "control"),
    "nul": ("owner.example\x00:7444", "control"),
    "tab": ("owner.example:\t7444", "control"),
    "del": ("owner.example\x7f:7444", "control"),
    "bidi override": ("owner\u202e.example:7444", "non-ASCII"),
    "unicode name": ("b\u00fccher.example:7444", "non-ASCII"),
    "kelvin sign": ("\u212a.example:7444", "non-ASCII"),
    "space": ("owner .example:7444", "a space"),
    "surrounding space": (" owner.example:7444", "a space"),
    "underscore": ("my_owner.example:7444", "underscore"),
    "leading hyphen": ("-owner.example:7444", "labels"),
    "trailing hyphen": ("owner-.example:7444", "labels"),
    "empty label": ("owner..example:7444", "labels"),
    "trailing dot": ("owner.example.:7444", "labels"),
    "leading dot": (".owner.example:7444", "labels"),
    "label of 64": (f"{'a' * 64}.example:1", "labels"),
    "name of 254": (f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 62}:1", "longer than 253"),
    "numeric top label": ("owner.123:7444", "numeric label"),
    "bad ipv4": ("192.0.2.256:7444", "not a valid IPv4"),
    "ipv4 leading zero": ("192.0.2.07:7444", "not a valid IPv4"),
    "short ipv4": ("192.0.2:7444", "not a valid IPv4"),
    "ipv6 without brackets": ("2001:db8::1:7444", "without brackets"),
    "ipv6 without brackets or port": ("::1", "without brackets"),
    "brackets around ipv4": ("[192.0.2.7]:7444", "not an IPv6"),
    "brackets around a name": ("[owner.example]:7444", "not an IPv6"),
    "brackets, no port": ("[2001:db8::1]", "no port"),
    "brackets, empty port": ("[2001:db8::1]:", "no port"),
    "unclosed bracket": ("[2001:db8::1:7444", "without ']'"),
    "stray bracket": ("owner.example]:7444", "brackets in the wrong place"),
    "zone id": ("[fe80::1%eth0]:7444", "zone id"),
    "encoded zone id": ("[fe80::1%25eth0]:7444", "zone id"),
    "userinfo": ("user@owner.example:7444", "userinfo"),
    "password": ("user:pw@owner.example:7444", "userinfo"),
    "path": ("owner.example:7444/x", "path"),
    "url": ("https://owner.example:7444", "path"),
    "two addresses": ("a.example:1,b.example:2", "comma"),
    "no host": (":7444", "no host"),
    "only a colon": (":", "no host"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case: str) -> None:
    text, fault = REFUSED[case]
    with pytest.raises(OwnerAddressError, match=fault) as info:
        parse(text)
    message = str(info.value)
    assert message.isprintable()  # printable non-ASCII may stay; controls and bidi are escaped
    for control in "\x00\x1b\n\r\t\x7f\u202e":
        assert control not in message
    assert len(message) < 250


def test_huge_input_is_refused_before_any_pattern_work() -> None:
    for text in ("a" * 10_000_000 + ":1", "[" + ":" * 1_000_000 + "]:1", "a." * 500_000 + "b:1"):
        started = time.monotonic()
        with pytest.raises(OwnerAddressError, match="longer than 300") as info:
            parse(text)
        assert time.monotonic() - started < 0.5
        assert len(str(info.value)) < 200
    with pytest.raises(OwnerAddressError, match="longer than 4096"):
        parse_list("a:1," * 1_000_000)


def test_not_text_is_refused() -> None:
    with pytest.raises(OwnerAddressError):
        parse(b"owner.example:1")  # type: ignore[arg-type]
    with pytest.raises(OwnerAddressError):
        parse_list(["owner.example:1"])  # type: ignore[arg-type]


def test_an_address_built_directly_must_be_canonical() -> None:
    assert str(OwnerAddress("owner.example", 7444)) == "owner.example:7444"
    for host, port in [("Owner.example", 1), ("[::1]", 1), ("2001:DB8::1", 1), ("a_b", 1), ("a b", 1),
                       ("", 1), ("a", 0), ("a", 65536), ("a@b", 1), ("a\n", 1)]:
        with pytest.raises(OwnerAddressError):
            OwnerAddress(host, port)
    with pytest.raises(OwnerAddressError):
        OwnerAddress("a", True)


def test_addresses_order_and_hash() -> None:
    a, b = parse("a.example:2"), parse("b.example:1")
    assert sorted([b, a]) == [a, b]
    assert len({a, parse("A.example:2")}) == 1


# -- lists


def test_list_forms() -> None:
    expected = (parse("a.example:1"), parse("[2001:db8::1]:2"), parse("192.0.2.7:3"))
    assert parse_list("a.example:1,[2001:db8::1]:2,192.0.2.7:3") == expected
    assert parse_list(" a.example:1 ,\t[2001:db8::1]:2 , 192.0.2.7:3 ") == expected
    assert parse_list("a.example:1\n[2001:db8::1]:2\r\n192.0.2.7:3\n") == expected  # a file
    assert parse_list("a.example:1") == expected[:1]


def test_list_duplicates_are_dropped_keeping_the_first_order() -> None:
    listed = parse_list("b.example:1,a.example:1,B.EXAMPLE:1,[2001:db8:0::1]:7,[2001:db8::1]:7,a.example:1")
    assert [str(a) for a in listed] == ["b.example:1", "a.example:1", "[2001:db8::1]:7"]


@pytest.mark.parametrize(("text", "fault"), [
    ("", "empty"),
    ("  \n ", "empty"),
    ("a.example:1,", "empty item"),
    (",a.example:1", "empty item"),
    ("a.example:1,,b.example:2", "empty item"),
    ("a.example:1, ,b.example:2", "empty item"),
    ("a.example:1,b.example", "no port"),
    ("a.example:1 b.example:2", "a space"),
    ("a.example:1,b\x1b.example:2", "control"),
    ("a.example:1,b.example:2\x00", "control"),
    ("a.example:1;b.example:2", "more than one ':'"),
    ("a.example:1;b.example", "not a decimal"),
    (",".join(f"h{i}.example:1" for i in range(MAX_ADDRESSES + 1)), "more than 8"),
    (",".join("h.example:1" for _ in range(MAX_ADDRESSES + 1)), "more than 8"),
])
def test_list_refused(text: str, fault: str) -> None:
    with pytest.raises(OwnerAddressError, match=fault):
        parse_list(text)


def test_list_of_eight_and_the_longest_list_fit() -> None:
    eight = [f"h{i}.example:{i + 1}" for i in range(MAX_ADDRESSES)]
    assert len(parse_list(",".join(eight))) == MAX_ADDRESSES
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57])
    longest = [OwnerAddress(f"{name}{i:04d}", 65535) for i in range(MAX_ADDRESSES)]
    text = encode_list(longest)
    assert len(text) <= owneraddr.MAX_LIST_TEXT
    assert parse_list(text) == tuple(longest)


def test_encode_list_round_trip_and_cmdline_fit() -> None:
    addresses = (parse("b.example:7444"), parse("[2001:db8::1]:7444"), parse("192.0.2.7:1"))
    text = encode_list(addresses)
    assert text == "b.example:7444,[2001:db8::1]:7444,192.0.2.7:1"
    assert " " not in text and "\n" not in text
    assert parse_list(text) == addresses
    assert encode_list(list(addresses)) == text


@pytest.mark.parametrize("bad", [(), tuple(parse(f"h{i}.example:1") for i in range(9)),
                                 (parse("a.example:1"), parse("a.example:1")), ("a.example:1",)])
def test_encode_list_refuses_what_parse_list_would(bad: tuple[object, ...]) -> None:
    with pytest.raises(OwnerAddressError):
        encode_list(bad)  # type: ignore[arg-type]


def test_the_error_quotes_a_truncated_excerpt() -> None:
    with pytest.raises(OwnerAddressError) as info:
        parse("x" * 290 + "\x1b:1")
    message = str(info.value)
    assert "x" * 61 not in message and "..." in message


def test_cheap_to_import() -> None:
    # The agent imports it at boot: nothing beyond the few standard modules it already loads.
    code = ("import sys; before = set(sys.modules); import imprint.owneraddr; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('imprint')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 (our own subprocess's repr of a list of names)
    heavy = {"socket", "json", "subprocess", "http.client", "email", "ssl", "yaml", "cryptography", "urllib"}
    assert not loaded & heavy, loaded & heavy
