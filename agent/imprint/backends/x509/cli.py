"""The x509 backend's part of the owner's command line: ``imprint ca init --x509`` (make the
owner's X.509 CA, or import one with ``--cert``/``--key``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imprint.owner.home import OwnerHome
    from imprint.owner.store import Store


class X509Cli:
    def add_commands(self, sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
        """None of its own."""

    def add_apply_options(self, parser: argparse.ArgumentParser) -> None:
        """None."""

    def apply_options(self, store: Store, vm: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    def add_ca_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--x509", action="store_true", help="the owner's X.509 CA instead (EC P-256, for [x509])")
        parser.add_argument("--cert", type=Path,
                            help="with --x509: import this CA certificate (PEM) instead of making one")
        parser.add_argument("--key", type=Path, help="with --x509: the key (PEM, unencrypted) of --cert")

    def ca_init(self, home: OwnerHome, args: argparse.Namespace, *, default: bool
                ) -> tuple[dict[str, Any], list[str]] | None:
        if not (args.x509 or args.cert or args.key):
            return None
        from imprint.backends.x509.owner import ca_init
        from imprint.owner.errors import UsageError

        if not args.x509:
            raise UsageError("--cert and --key import an X.509 CA: add --x509")
        path, fingerprint, created = ca_init(home, args.cert, args.key)
        verb = ("imported" if args.cert else "created") if created else "already exists"
        return ({"x509_ca_certificate": str(path), "sha256_fingerprint": fingerprint, "created": created},
                [f"X.509 CA {verb}: {path}", f"SHA-256 fingerprint: {fingerprint}"])


CLI = X509Cli()
