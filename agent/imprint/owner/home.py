"""The owner's home directory: identity key and certificate, the database, pinned VM certificates."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imprint import crypto, tokens
from imprint.fsatomic import ensure_private_dir, write_atomic
from imprint.owner.errors import OwnerError, UsageError
from imprint.owner.store import Store


def default_home() -> Path:
    if env := os.environ.get("IMPRINT_HOME"):
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "imprint"


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

    def known_hosts_file(self, vm: str) -> Path:
        return self.dir / "known_hosts" / vm

    @property
    def ssh_ca_key(self) -> Path:
        """The owner's SSH CA (``imprint ca init``): signs VM host keys, optionally trusted for users."""
        return self.dir / "ssh_ca"

    @property
    def ssh_ca_pub(self) -> Path:
        return self.dir / "ssh_ca.pub"

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
        if not self.initialised:
            raise UsageError(f"no owner identity in {self.dir}: run `imprint init` first")
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
        return crypto.certificate_der(self.cert_file.read_bytes())

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
