"""The owner key at rest, encrypted with a passphrase (``imprint init --passphrase``), and where
a passphrase comes from. docs/protocol.md §8.3 describes the format; this module is its one
reader and writer.

An encrypted owner.key is one armoured block of ASCII lines::

    -----BEGIN IMPRINT ENCRYPTED OWNER KEY-----
    Version: 1
    KDF: scrypt
    KDF-Params: n=131072,r=8,p=1
    Salt: <base64, 16 bytes>
    Cipher: AES-256-GCM
    Nonce: <base64, 12 bytes>

    <base64: AES-256-GCM(K, nonce, PKCS#8 DER of the Ed25519 key, AD = header)>
    -----END IMPRINT ENCRYPTED OWNER KEY-----

K = scrypt(passphrase, salt, n, r, p, 32 bytes). The associated data is the header's exact bytes,
from the BEGIN line through the empty line: a changed parameter, salt, nonce or version fails to
decrypt, as a changed ciphertext does. The header is also read strictly (every line, in this
order), and parameters that would cost more than MAX_SCRYPT_MEMORY are refused before scrypt runs.

A passphrase is read from, in this order: the file named by ``IMPRINT_PASSPHRASE_FILE``; the
systemd credential ``imprint.passphrase`` (``$CREDENTIALS_DIRECTORY/imprint.passphrase``); a
prompt on the terminal when stdin is one. Never from an argument or the environment's values.
A file must be a regular file that other users cannot read, at most MAX_PASSPHRASE bytes; one
trailing newline is not part of the passphrase.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from imprint import crypto
from imprint.owner.errors import UsageError

BEGIN = b"-----BEGIN IMPRINT ENCRYPTED OWNER KEY-----\n"
END = b"-----END IMPRINT ENCRYPTED OWNER KEY-----\n"
VERSION = 1
# scrypt's cost: ~0.3 s and 128 MiB on one core of a 2020s machine (cryptography 38 and 50),
# paid once per process (OwnerHome caches the key).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1
MIN_SCRYPT_N = 2 ** 14          # what a file may say (tests seal with the minimum to stay fast)
MAX_SCRYPT_MEMORY = 1 << 30     # bytes: 128 * n * r * p
SALT_BYTES = 16
MAX_FILE = 4096                 # an encrypted owner key is ~400 bytes
MAX_PASSPHRASE = 1024
ENV_FILE = "IMPRINT_PASSPHRASE_FILE"
CREDENTIAL = "imprint.passphrase"
WRONG = "wrong passphrase, or owner.key is damaged"

_B64 = rb"[A-Za-z0-9+/]+={0,2}"
_HEADER_RE = re.compile(
    rb"\A" + re.escape(BEGIN)
    + rb"Version: (?P<version>[0-9]{1,3})\n"
    + rb"KDF: scrypt\n"
    + rb"KDF-Params: n=(?P<n>[0-9]{1,8}),r=(?P<r>[0-9]{1,3}),p=(?P<p>[0-9]{1,3})\n"
    + rb"Salt: (?P<salt>" + _B64 + rb")\n"
    + rb"Cipher: AES-256-GCM\n"
    + rb"Nonce: (?P<nonce>" + _B64 + rb")\n"
    + rb"\n"
)
_BODY_RE = re.compile(rb"\A(?P<ciphertext>" + _B64 + rb")\n" + re.escape(END) + rb"\Z")


@dataclass(frozen=True)
class Sealed:
    """An encrypted owner key file, parsed (nothing decrypted)."""

    header: bytes  # the associated data
    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    ciphertext: bytes


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` (a key file, or its first bytes) is in this format rather than PEM."""
    return data.startswith(BEGIN)


def seal(key: crypto.PrivateKey, passphrase: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
         p: int = SCRYPT_P) -> bytes:
    """The encrypted key file for ``key``: a fresh salt and nonce each time."""
    _check_passphrase(passphrase)
    _check_params(n, r, p)
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(crypto.AEAD_NONCE_BYTES)
    header = (BEGIN + f"Version: {VERSION}\nKDF: scrypt\nKDF-Params: n={n},r={r},p={p}\n".encode()
              + b"Salt: " + base64.b64encode(salt) + b"\nCipher: AES-256-GCM\n"
              + b"Nonce: " + base64.b64encode(nonce) + b"\n\n")
    k = crypto.scrypt(passphrase, salt=salt, n=n, r=r, p=p)
    ciphertext = crypto.aead_seal(k, nonce, key.to_der(), header)
    return header + base64.b64encode(ciphertext) + b"\n" + END


def parse(data: bytes) -> Sealed:
    """The fields of an encrypted key file; UsageError (naming the field, never quoting the
    bytes) for one that is not in this format."""
    if len(data) > MAX_FILE:
        raise UsageError(f"owner.key is damaged: larger than {MAX_FILE} bytes")
    found = _HEADER_RE.match(data)
    if found is None:
        raise UsageError("owner.key is damaged: its header is not that of an imprint encrypted owner key "
                         "(docs/protocol.md §8.3)")
    if int(found["version"]) != VERSION:
        raise UsageError(f"owner.key is in format version {int(found['version'])}; this imprint reads "
                         f"version {VERSION}")
    n, r, p = int(found["n"]), int(found["r"]), int(found["p"])
    _check_params(n, r, p)
    body = _BODY_RE.match(data[found.end():])
    if body is None:
        raise UsageError("owner.key is damaged: its ciphertext is not one base64 line before the END line")
    try:
        salt, nonce, ciphertext = (base64.b64decode(found["salt"], validate=True),
                                   base64.b64decode(found["nonce"], validate=True),
                                   base64.b64decode(body["ciphertext"], validate=True))
    except binascii.Error:
        raise UsageError("owner.key is damaged: bad base64") from None
    if len(salt) != SALT_BYTES or len(nonce) != crypto.AEAD_NONCE_BYTES \
            or len(ciphertext) <= crypto.AEAD_TAG_BYTES:
        raise UsageError("owner.key is damaged: a salt, nonce or ciphertext of the wrong length")
    return Sealed(data[:found.end()], n, r, p, salt, nonce, ciphertext)


def unseal(data: bytes, passphrase: bytes) -> crypto.PrivateKey:
    """The key in an encrypted key file; UsageError if the passphrase or the file is wrong."""
    sealed = parse(data)
    k = crypto.scrypt(passphrase, salt=sealed.salt, n=sealed.n, r=sealed.r, p=sealed.p)
    try:
        der = crypto.aead_open(k, sealed.nonce, sealed.ciphertext, sealed.header)
        return crypto.PrivateKey.from_der(der)
    except crypto.CryptoError:
        raise UsageError(WRONG) from None


def _check_params(n: int, r: int, p: int) -> None:
    if n < MIN_SCRYPT_N or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 \
            or 128 * n * r * p > MAX_SCRYPT_MEMORY:
        raise UsageError(f"owner.key is damaged: scrypt parameters n={n}, r={r}, p={p} are outside what "
                         f"imprint accepts (n a power of 2 from {MIN_SCRYPT_N}, at most "
                         f"{MAX_SCRYPT_MEMORY >> 20} MiB)")


def _check_passphrase(passphrase: bytes) -> None:
    if not passphrase:
        raise UsageError("the passphrase is empty")
    if len(passphrase) > MAX_PASSPHRASE:
        raise UsageError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")


# ---- where a passphrase comes from


def read_passphrase_file(path: Path, what: str) -> bytes:
    """The passphrase in ``path`` (``what`` names where the name came from, for messages)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o007:
            raise UsageError(f"{what} {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                             f"chmod 600 it (and choose a new passphrase if others may have read it)")
        if st.st_size > MAX_PASSPHRASE + 2:
            raise UsageError(f"{what} {path} is larger than a passphrase ({MAX_PASSPHRASE} bytes at most)")
        data = os.read(fd, MAX_PASSPHRASE + 3)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise UsageError(f"{what} {path} holds an empty passphrase")
    _check_passphrase(data)
    return data


def passphrase(key_file: Path, *, new: bool) -> bytes:
    """The passphrase for ``key_file``: from IMPRINT_PASSPHRASE_FILE, the systemd credential, or
    the terminal (asked twice when ``new``). UsageError, saying how to give one, when none is."""
    if name := os.environ.get(ENV_FILE):
        return read_passphrase_file(Path(name), ENV_FILE)
    if (directory := os.environ.get("CREDENTIALS_DIRECTORY")) and (Path(directory) / CREDENTIAL).exists():
        return read_passphrase_file(Path(directory) / CREDENTIAL, "the systemd credential")
    if sys.stdin is not None and sys.stdin.isatty():
        return _prompt(key_file, new=new)
    if new:
        raise UsageError(f"a new passphrase for {key_file} is needed: run on a terminal to be asked for it, or "
                         f"name a file holding it (mode 600) in {ENV_FILE}")
    raise UsageError(f"{key_file} is encrypted and no passphrase was given: run on a terminal to be asked for "
                     f"it, or name a file holding it (mode 600) in {ENV_FILE} (for `imprint serve` under systemd: "
                     f"LoadCredential={CREDENTIAL})")


def _prompt(key_file: Path, *, new: bool) -> bytes:
    import getpass

    try:
        first = getpass.getpass(f"{'new ' if new else ''}passphrase for {key_file}: ").encode()
        if new:
            again = getpass.getpass("the same passphrase again: ").encode()
            if not crypto.digests_equal(crypto.sha256(first), crypto.sha256(again)):
                raise UsageError("the two passphrases differ")
    except EOFError:
        raise UsageError("no passphrase given") from None
    _check_passphrase(first)
    return first
