"""The owner's home directory; every path in it is made here.

Layout (``$IMPRINT_HOME``, else ``$XDG_DATA_HOME/imprint``; 0700)::

    owner.key, owner.crt        the owner identity (``imprint init``)
    imprint.db                  the database (imprint.owner.store)
    pins/<vm>.crt               each VM's pinned certificate, as the database has it
    <backend file>              a backend's own file, by the name it gives: ssh_ca, ssh_ca.pub
                                (ssh), x509_ca.pem, x509_ca.key (x509)      -- backend_file
    <kind>/<vm>                 a backend's file per VM: known_hosts/<vm> (ssh) -- backend_vm_file
    .<prefix>XXXX/              a private scratch directory, removed after use  -- temp_dir
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imprint import crypto, tokens
from imprint.fsatomic import ensure_private_dir, write_atomic
from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.store import Store

T = TypeVar("T")

# A backend's file or directory name in the home: one component, not hidden, not the core's.
_BACKEND_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
_CORE_NAMES = frozenset({"owner.key", "owner.crt", "imprint.db", "imprint.db-wal", "imprint.db-shm", "pins"})


def default_home() -> Path:
    if env := os.environ.get("IMPRINT_HOME"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "imprint"


_Stamp = tuple[int, int, int, int]
# What this process loaded from owner homes: (what, home) -> (the files' identity when read, value).
_LOADED: dict[tuple[str, Path], tuple[tuple[_Stamp, ...], Any]] = {}


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

    def init(self) -> tuple[crypto.PrivateKey, bool]:
        """Create the owner identity once; later calls load it. Returns (key, created)."""
        if self.initialised:
            return self.load_key(), False
        self._ensure_dir()
        key = crypto.PrivateKey.generate()
        write_atomic(self.key_file, key.to_pem())
        write_atomic(self.cert_file, key.self_signed_certificate("imprint-owner"), mode=0o644)
        self.store().close()
        return key, True

    def load_key(self) -> crypto.PrivateKey:
        """The owner key, checked against owner.crt. Parsed once per process while neither file
        changes (a fleet binds with it hundreds of times a second)."""
        if not self.initialised:
            raise UsageError(f"no owner identity in {self.dir}: run `imprint init` first")
        return self._loaded("key", (self.key_file, self.cert_file), self._load_key)

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

    def _load_key(self) -> crypto.PrivateKey:
        try:
            key = crypto.PrivateKey.from_pem(self.key_file.read_bytes())
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


def _backend_name(name: str) -> str:
    if not _BACKEND_NAME_RE.match(name) or name in _CORE_NAMES:
        raise ValueError(f"{name!r} cannot name a backend's file in the owner home")
    return name
