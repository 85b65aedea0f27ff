"""Writes the seed corpora of the protocol, token, control-channel and profile targets.

``python -m tests.fuzz.seeds`` rewrites tests/fuzz/corpus/<name>/ for the targets listed in SEEDS
(the other targets' owners keep their seeds by hand). The seeds are deterministic (fixed keys and
nonces: see _exchange.py), so a rerun changes nothing unless the protocol did, and
tests/test_fuzz.py checks that the committed files are what this writes. Each seed is a valid
input or a near miss: the fuzzer mutates from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from imprint.protocol.errors import AlertCode
from imprint.protocol.exchange import State
from imprint.protocol.messages import MAX_BODY, Alert, encode_frame
from imprint.tokens import Mode, Token, TokenKind, vm_token_line

from tests.fuzz import _exchange as ex
from tests.fuzz.run import corpus_dir
from tests.helpers.keys import OWNER_CERT


def _payload(label: str) -> bytes:
    return hashlib.sha256(b"imprint fuzz seed\0" + label.encode()).digest()


def _token(kind: TokenKind, label: str = "") -> Token:
    return Token(kind, _payload(kind.name + label))


def frames() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for mode in ex.MODES:
        g = ex.genuine(mode)
        seeds[f"{mode.value}-whole-exchange"] = b"\xff" + b"".join(g.values())
        seeds[f"{mode.value}-bytewise-vm-flight"] = b"\x00" + g["VmHello"] + g["VmProof"]
        seeds[f"{mode.value}-dial-out-whole-exchange"] = b"\xff" + b"".join(ex.genuine(mode, ex.OUT).values())
    seeds["alert"] = b"\x10" + encode_frame(Alert(int(AlertCode.WRONG_TOKEN), b"wrong token"))
    seeds["max-body"] = b"\xff" + MAX_BODY.to_bytes(2, "big") + bytes([1, 15, 1, 0, 0]) + bytes(MAX_BODY - 5)
    seeds["oversized-length"] = b"\x01" + (MAX_BODY + 1).to_bytes(2, "big") + b"\x01\x0f"
    seeds["version-2"] = b"\xff" + bytes([0, 4, 2, 15, 1, 0])
    seeds["unknown-type"] = b"\xff" + bytes([0, 2, 1, 9])
    return seeds


def _named(seeds: dict[str, bytes], points: tuple[ex.Point, ...], mode: Mode) -> Callable[..., None]:
    """``seed(name, point, data, size=, close=)``: records one seed named
    ``<mode>-<direction>-<state>-<name>`` (``-then-close`` at the end when the peer closes), so
    a seed's name says where parse_selector puts it; tests/test_fuzz.py checks that it does."""

    def seed(name: str, point: ex.Point, data: bytes, *, size: int = 256, close: bool = False) -> None:
        full = f"{mode.value}-{point.label}-{name}{'-then-close' if close else ''}"
        assert full not in seeds, full
        seeds[full] = ex.selector_for(mode, point, points, size=size, close=close) + data

    return seed


def _vm_dial(mode: Mode, **changes: object) -> bytes:
    """The genuine VmDial of ``mode`` with ``changes`` made (a near miss the listener refuses)."""
    (message,) = ex.decoded(ex.genuine(mode, ex.OUT)["VmDial"])
    return encode_frame(dataclasses.replace(message, **changes))


def exchange_vm() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for mode in ex.MODES:
        seed = _named(seeds, ex.VM_STATES, mode)
        for direction in ex.Direction:
            g = ex.genuine(mode, direction)

            def at(state: State, direction: ex.Direction = direction) -> ex.Point:
                return ex.Point(direction, state)

            seed("genuine-owner-side", at(State.AWAIT_OWNER_HELLO), g["OwnerHello"] + g["OwnerProof"])
            seed("genuine-bytewise", at(State.AWAIT_OWNER_HELLO), g["OwnerHello"] + g["OwnerProof"],
                 size=1, close=True)
            seed("owner-proof", at(State.AWAIT_OWNER_PROOF), g["OwnerProof"])
            seed("owner-hello-twice", at(State.AWAIT_OWNER_PROOF), g["OwnerHello"])
            seed("late-frame", at(State.AWAIT_LOCAL_CONFIRM), g["OwnerProof"])
            seed("owner-hello-again", at(State.DONE), g["OwnerHello"], close=True)
            seed("alert", at(State.AWAIT_OWNER_PROOF), encode_frame(
                Alert(int(AlertCode.AUTHENTICATION_FAILED), b"\x1b[31mno\r\n")))
        # Dial-out only: bytes before initiate(), a VmDial reflected back, and the other
        # direction's OwnerHello (bound to another server certificate and transcript).
        out = ex.genuine(mode, ex.OUT)
        seed("owner-hello-before-initiate", ex.Point(ex.OUT, State.START), out["OwnerHello"])
        seed("vm-dial-reflected", ex.Point(ex.OUT, State.AWAIT_OWNER_HELLO), out["VmDial"])
        seed("dial-in-owner-hello", ex.Point(ex.OUT, State.AWAIT_OWNER_HELLO),
             ex.genuine(mode, ex.IN)["OwnerHello"] + out["OwnerProof"])
        seed("dial-out-owner-hello", ex.Point(ex.IN, State.AWAIT_OWNER_HELLO), out["OwnerHello"] + out["OwnerProof"])
    return seeds


def exchange_owner() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for mode in ex.MODES:
        seed = _named(seeds, ex.OWNER_STATES, mode)
        for direction in ex.Direction:
            g = ex.genuine(mode, direction)

            def at(state: State, direction: ex.Direction = direction) -> ex.Point:
                return ex.Point(direction, state)

            vm_side = g["VmHello"] + g["VmProof"] + g["VmConfirm"]
            seed("genuine-vm-side", at(State.AWAIT_VM_HELLO), vm_side)
            seed("genuine-bytewise", at(State.AWAIT_VM_HELLO), vm_side, size=1, close=True)
            seed("vm-proof", at(State.AWAIT_VM_PROOF), g["VmProof"] + g["VmConfirm"])
            seed("vm-confirm", at(State.AWAIT_VM_CONFIRM), g["VmConfirm"])
            seed("vm-confirm-again", at(State.DONE), g["VmConfirm"], close=True)
            seed("alert", at(State.AWAIT_VM_HELLO), encode_frame(
                Alert(int(AlertCode.TOKEN_CONSUMED), b"this VM was bound meanwhile")))
        seed("vm-hello-before-initiate", ex.Point(ex.IN, State.START), ex.genuine(mode, ex.IN)["VmHello"])
        # Dial-out: the listener from VmDial on. VmDial is 303 bytes: read in chunks of 101,
        # it ends at a chunk's end, so the target accepts before VmHello arrives.
        out = ex.genuine(mode, ex.OUT)
        dialled = ex.Point(ex.OUT, State.AWAIT_VM_DIAL)
        assert len(out["VmDial"]) % 101 == 0
        seed("genuine-whole", dialled, out["VmDial"] + out["VmHello"] + out["VmProof"] + out["VmConfirm"], size=101)
        seed("genuine-bytewise", dialled, out["VmDial"] + out["VmHello"] + out["VmProof"] + out["VmConfirm"],
             size=1, close=True)
        seed("vm-dial", dialled, out["VmDial"])
        seed("vm-dial-and-vm-hello-in-one-read", dialled, out["VmDial"] + out["VmHello"])
        seed("unknown-token", dialled, _vm_dial(mode, token_id=bytes(8)))
        seed("other-vm-cert", dialled, _vm_dial(mode, vm_cert=OWNER_CERT) + out["VmHello"], size=1)
        seed("owner-hello-reflected", dialled, out["OwnerHello"])
        seed("vm-hello-before-accept", ex.Point(ex.OUT, State.AWAIT_LOCAL_ACCEPT), out["VmHello"])
        seed("dial-in-vm-flight", ex.Point(ex.OUT, State.AWAIT_VM_HELLO),
             ex.genuine(mode, ex.IN)["VmHello"] + ex.genuine(mode, ex.IN)["VmProof"])
    return seeds


def token_texts() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for kind in TokenKind:
        text = _token(kind).encode()
        seeds[f"{kind.name.lower()}"] = text.encode()
        seeds[f"{kind.name.lower()}-pasted"] = f"  {text.upper()}\n".encode()
        seeds[f"{kind.name.lower()}-last-char"] = (text[:-1] + ("a" if text[-1] != "a" else "b")).encode()
        seeds[f"{kind.name.lower()}-truncated"] = text[:-3].encode()
    shared = _token(TokenKind.SHARED).encode()
    seeds["version-2"] = shared.replace("imprint1", "imprint2", 1).encode()
    seeds["kind-x"] = shared.replace("imprint1s", "imprint1x", 1).encode()
    seeds["non-ascii-digit"] = shared.replace("imprint1", "imprint\u0661", 1).encode()
    seeds["too-long"] = (shared + "a" * 80).encode()
    seeds["empty"] = b""
    return seeds


def vm_token_lines() -> dict[str, bytes]:
    vm, other = _token(TokenKind.VM), _token(TokenKind.VM, "other")
    owner = _token(TokenKind.SHARED)
    line = vm_token_line(vm)
    answered = f"{line} for {owner.token_id.hex()}"
    boot = "[    0.000000] Linux version 6.1.0-18-amd64\n[    1.234567] systemd[1]: Started imprint-agent.\n"
    return {
        "announcement": f"{boot}{line}\n".encode(),
        "announcement-answering": f"{boot}{answered}\r\n".encode(),
        "serial-crlf-repeated": f"{answered}\r\n{answered}\r\n".encode(),
        "two-tokens": f"{line}\n{vm_token_line(other)}\n".encode(),
        "quoted-mid-line": f"imprint-agent: peer refused: {line}\n".encode(),
        "after-carriage-return": f"junk\r{line}\n".encode(),
        "after-line-separator": f"junk\u2028{line}\n".encode(),
        "owner-token-announced": f"IMPRINT-VM-TOKEN {owner.encode()}\n".encode(),
        "garbled": (line[:-1] + "\x00\n").encode(),
        "trailing-words": f"{line} extra\n".encode(),
    }


def control_http() -> dict[str, bytes]:
    body = json.dumps({"backends": {"ssh": {"users": [{"name": "alice"}]}}}).encode()

    def post(payload: bytes, extra: str = "") -> bytes:
        return (f"POST /v1/apply HTTP/1.1\r\nHost: vm\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload

    status = b"GET /v1/status HTTP/1.1\r\nHost: vm\r\n\r\n"
    return {
        "status": status,
        "status-close": b"GET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",
        "apply": post(body),
        "keep-alive-pipelined": status + post(body) + status,
        "apply-not-an-object": post(b"[1, 2]"),
        "apply-unknown-key": post(b'{"backends": {"ssh": {}}, "x": 1}'),
        "apply-not-json": post(b"{not json"),
        "chunked": b"POST /v1/apply HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "bad-length": b"POST /v1/apply HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "truncated-body": b"POST /v1/apply HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
        "wrong-method": b"DELETE /v1/status HTTP/1.1\r\n\r\n",
        "unknown-path": b"GET /v2/status HTTP/1.0\n\n",
        "bare-lf-headers": b"GET /v1/status HTTP/1.1\nHost: vm\nX: y\n\n",
    }


def owner_answer() -> dict[str, bytes]:
    """A VM's answers as the owner reads them; the first byte sets the size of each read."""
    status = b'{"state": "bound", "vm_fingerprint": "SHA256:x", "owner_fingerprint": "SHA256:y"}'

    def answer(body: bytes, head: bytes = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n") -> bytes:
        return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body

    return {
        "status-whole": b"\xff" + answer(status),
        "status-byte-by-byte": b"\x00" + answer(status),
        "error-404": b"\x01" + answer(b'{"error": "no such endpoint: /v2"}', b"HTTP/1.1 404 Not Found\r\n"),
        "not-an-object": b"\x02" + answer(b"[1, 2]"),
        "deep-json": b"\x03" + answer(b"[" * 5000 + b"]" * 5000),
        "chunked": b"\x04HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "no-length": b"\x05HTTP/1.1 200 OK\r\n\r\n{}",
        "too-long-body": b"\x06HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}{}",
        "truncated-body": b"\x07HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
        "bad-status-line": b"\x08HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}",
        "empty": b"\x09",
    }


def profile_toml() -> dict[str, bytes]:
    return {
        "ssh": b'[ssh]\nusers = [\n'
               b'  {name = "alice", authorized_keys = ["ssh-ed25519 AAAA alice@laptop"], sudo = true},\n'
               b'  {name = "carol", shell = "/bin/sh"},\n]\n'
               b'host_certificate = true\nhost_certificate_validity = "+52w"\n',
        "kerberos": b'[kerberos]\nrealm = "EXAMPLE.ORG"\nkdc = ["kdc1.example.org", "kdc2.example.org:88"]\n'
                    b'admin_principal = "imprint/admin@EXAMPLE.ORG"\n',
        "x509": b'[x509]\nnames = ["www.example.org"]\ninclude_vm_name = true\nallowed_networks = ["10.0.0.0/8"]\n'
                b"validity_days = 90\n",
        "cloudinit-table": b'[cloudinit]\nalways = false\n[cloudinit.config]\npackages = ["nginx"]\n'
                           b'write_files = [{path = "/etc/motd", content = """hi\n"""}]\n',
        "types": b"[t]\na = 1979-05-27T07:32:00Z\nb = 0x1f\nc = inf\nd = 'lit'\ne = '''ml'''\nf = [[1], [2]]\n"
                 b'g = {h = {i = 1}}\n[[arr]]\nx = 1\n',
        "not-a-table": b'ssh = "yes"\n',
        "empty": b"",
        "duplicate-key": b"[ssh]\na = 1\na = 2\n",
    }


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "frames": frames,
    "exchange_vm": exchange_vm,
    "exchange_owner": exchange_owner,
    "tokens": token_texts,
    "vm_token_lines": vm_token_lines,
    "control_http": control_http,
    "profile_toml": profile_toml,
    "owner_answer": owner_answer,
}


def write(name: str) -> list[Path]:
    directory = corpus_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    wanted = SEEDS[name]()
    for stale in directory.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    paths = []
    for seed, data in wanted.items():
        path = directory / seed
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths.append(path)
    return paths


def main() -> int:
    for name in SEEDS:
        print(f"{name}: {len(write(name))} seeds in {corpus_dir(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
