"""The owner's home directory; every path in it is made here.

Layout (``$IMPRINT_HOME``, else ``$XDG_DATA_HOME/imprint``; 0700)::

    owner.key, owner.crt        the owner identity (``imprint init``); owner.key is PEM, or
                                encrypted with a passphrase (``init --passphrase``: keyfile.py)
    imprint.db                  the database (imprint.owner.store)
    pins/<vm>.crt               each VM's pinned certificate, as the database has it
    serve.sock                  the running listener's local socket (``imprint serve``: serve.py)
    <backend file>              a backend's own file, by the name it gives: ssh_ca, ssh_ca.pub
                                (ssh), x509_ca.pem, x509_ca.key (x509)      -- backend_file
    <kind>/<vm>                 a backend's file per VM: known_hosts/<vm> (ssh) -- backend_vm_file
    .<prefix>XXXX/              a private scratch directory, removed after use  -- temp_dir
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imprint import crypto, tokens
from imprint.fsatomic import ensure_private_dir, write_atomic
from imprint.owner import keyfile
from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.store import Store

T = TypeVar("T")

# A backend's file or directory name in the home: one component, not hidden, not the core's.
_BACKEND_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
_CORE_NAMES = frozenset({"owner.key", "owner.crt", "imprint.db", "imprint.db-wal", "imprint.db-shm", "pins",
                         "serve.sock"})


def default_home() -> Path:
    if env := os.environ.get("IMPRINT_HOME"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "imprint"


_Stamp = tuple[int, int, int, int]
# What this process loaded from owner homes: (what, home) -> (the files' identity when read, value).
_LOADED: dict[tuple[str, Path], tuple[tuple[_Stamp, ...], Any]] = {}
# One key load at a time: threads that need an encrypted key wait for one scrypt (and one prompt).
_KEY_LOCK = threading.RLock()


def _file_stamp(path: Path) -> _Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class OwnerHome:
    dir: Path

    @property
    def key_file(self) -> Path:
        return self.dir / "owner.key"

    @property
    def cert_file(self) -> Path:
        return self.dir / "owner.crt"

    @property
    def db_file(self) -> Path:
        return self.dir / "imprint.db"

    @property
    def serve_socket(self) -> Path:
        return self.dir / "serve.sock"

    def pin_file(self, vm: str) -> Path:
        return self.dir / "pins" / f"{vm}.crt"

    # -- a backend's files: the backend names them, the home says where they are
    def backend_file(self, name: str) -> Path:
        """A backend's file at the top of the home (ssh's ``ssh_ca``, x509's ``x509_ca.pem``)."""
        return self.dir / _backend_name(name)

    def backend_vm_file(self, kind: str, vm: str) -> Path:
        """A backend's file for one VM, in a directory of its own (ssh's ``known_hosts/<vm>``)."""
        return self.dir / _backend_name(kind) / vm

    def temp_dir(self, prefix: str) -> Path:
        """A new private directory in the home (the same file system, so a file made in it can be
        renamed into place); the caller removes it."""
        self._ensure_dir()
        return Path(tempfile.mkdtemp(prefix=f".{prefix}", dir=self.dir))

    @property
    def initialised(self) -> bool:
        return self.key_file.exists() and self.cert_file.exists()

    def init(self, passphrase: bytes | None = None) -> tuple[crypto.PrivateKey, bool]:
        """Create the owner identity once (its key encrypted with ``passphrase`` if given); later
        calls load it (with ``passphrase``, if the key is encrypted). Returns (key, created)."""
        if self.initialised:
            return (self.unlock(passphrase) if passphrase is not None and self.encrypted else self.load_key()), False
        self._ensure_dir()
        key = crypto.PrivateKey.generate()
        write_atomic(self.key_file, key.to_pem() if passphrase is None else keyfile.seal(key, passphrase))
        write_atomic(self.cert_file, owner_certificate(key), mode=0o644)
        self._remember_key(key)
        self.store().close()
        return key, True

    @property
    def encrypted(self) -> bool:
        """Whether owner.key is encrypted with a passphrase (keyfile.py)."""
        return keyfile.is_sealed(_head(self.key_file))

    def protect(self, passphrase: bytes) -> bool:
        """Encrypt an unencrypted owner.key in place (one atomic replace), or check ``passphrase``
        against an encrypted one. True if it encrypted the key now."""
        with _KEY_LOCK:
            if self.encrypted:
                self.unlock(passphrase)
                return False
            key = self.load_key()
            write_atomic(self.key_file, keyfile.seal(key, passphrase))
            self._remember_key(key)
            return True

    def unlock(self, passphrase: bytes) -> crypto.PrivateKey:
        """Decrypt an encrypted owner.key with ``passphrase`` for the rest of this process (a
        library's way to give it; the CLI's sources are keyfile.passphrase)."""
        with _KEY_LOCK:
            _LOADED.pop(("key", self.dir), None)
            return self._loaded("key", (self.key_file, self.cert_file), lambda: self._load_key(passphrase))

    def exported_key(self, new_passphrase: Callable[[], bytes]) -> bytes:
        """owner.key encrypted, for a backup: an encrypted home's own file (its passphrase), else
        the key sealed with ``new_passphrase()``."""
        if not self.initialised:
            raise UsageError(f"no owner identity in {self.dir}: run `imprint init` first")
        if self.encrypted:
            data = _read_key_file(self.key_file)
            keyfile.parse(data)
            return data
        return keyfile.seal(self.load_key(), new_passphrase())

    def import_key(self, data: bytes, passphrase: Callable[[], bytes]) -> crypto.PrivateKey:
        """Install an exported key (``data``, decrypted with ``passphrase()``) as the identity of
        this new home: owner.key stays encrypted as it is, owner.crt is made for it."""
        if self.key_file.exists() or self.cert_file.exists():
            raise UsageError(f"{self.dir} already has an owner identity: refusing to overwrite it "
                             f"(import into a new home, --home DIR)")
        if not keyfile.is_sealed(data):
            raise UsageError("not an imprint encrypted owner key (`imprint key export` writes one)")
        keyfile.parse(data)
        key = keyfile.unseal(data, passphrase())
        self._ensure_dir()
        write_atomic(self.key_file, data)
        write_atomic(self.cert_file, owner_certificate(key), mode=0o644)
        self._remember_key(key)
        self.store().close()
        return key

    def load_key(self) -> crypto.PrivateKey:
        """The owner key, checked against owner.crt. Parsed once per process while neither file
        changes (a fleet binds with it hundreds of times a second); an encrypted one is
        decrypted once, with the passphrase from keyfile.passphrase."""
        if not self.initialised:
            raise UsageError(f"no owner identity in {self.dir}: run `imprint init` first")
        with _KEY_LOCK:
            return self._loaded("key", (self.key_file, self.cert_file), self._load_key)

    def _remember_key(self, key: crypto.PrivateKey) -> None:
        """``key`` is what owner.key holds now (this process just wrote it): no passphrase again."""
        try:
            stamp = tuple(_file_stamp(path) for path in (self.key_file, self.cert_file))
        except OSError:
            return
        _LOADED[("key", self.dir)] = (stamp, key)

    def _loaded(self, what: str, files: tuple[Path, ...], load: Callable[[], T]) -> T:
        """``load()``, once per process while none of ``files`` changes (by device, inode,
        mtime and size)."""
        try:
            stamp = tuple(_file_stamp(path) for path in files)
        except OSError as exc:
            raise OwnerError(f"cannot read {files[0]}: {exc.strerror or exc}") from None
        cached = _LOADED.get((what, self.dir))
        if cached is not None and cached[0] == stamp:
            return cached[1]  # type: ignore[no-any-return]
        value = load()
        _LOADED[(what, self.dir)] = (stamp, value)
        return value

    def _load_key(self, passphrase: bytes | None = None) -> crypto.PrivateKey:
        try:
            data = _read_key_file(self.key_file)
            if keyfile.is_sealed(data):
                self._file_checked(keyfile.parse, data)  # a damaged file is refused before a passphrase is asked for
                given = passphrase or keyfile.passphrase(self.key_file, new=False)
                key = self._file_checked(keyfile.unseal, data, given)
            else:
                key = crypto.PrivateKey.from_pem(data)
        except crypto.CryptoError as exc:
            raise UsageError(f"{self.key_file}: {exc}") from None
        except OSError as exc:
            raise OwnerError(f"cannot read {self.key_file}: {exc.strerror or exc}") from None
        try:
            spki = crypto.certificate_spki(self.cert_file.read_bytes())
        except (crypto.CryptoError, ValueError) as exc:
            raise UsageError(f"{self.cert_file} is not a certificate: {exc}") from None
        except OSError as exc:
            raise OwnerError(f"cannot read {self.cert_file}: {exc.strerror or exc}") from None
        if not crypto.digests_equal(spki, key.public.spki):
            raise UsageError(f"{self.cert_file} does not carry the key in {self.key_file}")
        return key

    def _file_checked(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)``, its UsageError naming this home's owner.key."""
        try:
            return read(*args)
        except UsageError as exc:
            raise UsageError(f"{self.key_file}: {exc}") from None

    def new_token(self, mode: tokens.Mode) -> tokens.Token:
        """The token for a new VM: a fresh single-use K (shared), or the hash of this owner's key
        (nosecret)."""
        if mode is tokens.Mode.SHARED:
            return tokens.Token(tokens.TokenKind.SHARED, os.urandom(tokens.PAYLOAD_BYTES))
        return tokens.Token(tokens.TokenKind.NOSECRET, self.load_key().public.digest)

    def cert_der(self) -> bytes:
        """owner.crt as DER; parsed once per process while the file does not change."""
        return self._loaded("cert", (self.cert_file,), lambda: crypto.certificate_der(self.cert_file.read_bytes()))

    def store(self) -> Store:
        self._ensure_dir()
        return Store(self.db_file)

    def _ensure_dir(self) -> None:
        try:
            ensure_private_dir(self.dir)
        except OSError as exc:
            raise OwnerError(f"cannot use {self.dir} as the owner home: {exc.strerror or exc}") from None

    def write_pin_file(self, vm: str, cert_pem: str) -> Path:
        path = self.pin_file(vm)
        data = cert_pem.encode()
        if path.exists() and path.read_bytes() == data:
            return path  # derived from the database; rewritten only when it differs
        ensure_private_dir(path.parent)
        write_atomic(path, data)
        return path


def _head(path: Path) -> bytes:
    """The first bytes of a key file (enough to tell its format); empty if it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read(len(keyfile.BEGIN))
    except OSError:
        return b""


def _read_key_file(path: Path) -> bytes:
    with open(path, "rb") as file:
        data = file.read(keyfile.MAX_FILE + 1)
    if len(data) > keyfile.MAX_FILE:
        raise UsageError(f"larger than {keyfile.MAX_FILE} bytes: not an owner key")
    return data


def key_pem_for_tls(key_file: str | os.PathLike[str]) -> bytes | None:
    """What the TLS layer loads for the owner key file ``key_file`` (tls.owner_* contexts):
    None for an unencrypted PEM file, which ssl reads from its path as it always has; for an
    encrypted owner.key, the decrypted key as PEM, in memory only (this process's cached key,
    decrypted once with the passphrase if not yet)."""
    path = Path(key_file)
    if not keyfile.is_sealed(_head(path)):
        return None
    home = OwnerHome(path.parent)
    if home.key_file != path:
        raise UsageError(f"{path} is an encrypted owner key outside an owner home's owner.key")
    return home.load_key().to_pem()


def owner_certificate(key: crypto.PrivateKey) -> bytes:
    """owner.crt for ``key``: self-signed, with a subject of its own (a VM trusts its owner and
    its delegates at once, and OpenSSL finds a trust anchor by its subject name)."""
    return key.self_signed_certificate(f"imprint-owner {key.public.digest.hex()[:32]}")


def _backend_name(name: str) -> str:
    if not _BACKEND_NAME_RE.match(name) or name in _CORE_NAMES:
        raise ValueError(f"{name!r} cannot name a backend's file in the owner home")
    return name
