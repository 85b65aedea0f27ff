"""The ssh backend's part of the owner's command line: ``imprint ssh``, ``--ssh-host`` and
``--ssh-port`` of ``bind`` and ``apply``, and the SSH CA that ``imprint ca init`` makes by default.

Kept light: the parser is built on every ``imprint`` run; the owner half loads when used.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imprint.owner.home import OwnerHome
    from imprint.owner.store import Store


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port '{value}' is not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return port


def cmd_ssh(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.backends.ssh.owner import exec_ssh, quoted, ssh_command
    from imprint.owner.cli import bound_pin, out, valid_name

    name = valid_name(args.name)
    store = home.store()
    bound_pin(store, name)
    argv = ssh_command(home, store, name, args.user, list(args.ssh_args))
    store.close()
    if args.print:
        out(quoted(argv))
        return 0
    exec_ssh(argv)
    return 0  # not reached


class SshCli:
    def add_commands(self, sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
        p = sub.add_parser("ssh", help="run OpenSSH to a VM, trusting only the host keys its agent attested")
        p.add_argument("name")
        p.add_argument("-l", "--user", help="remote user")
        p.add_argument("--print", action="store_true", help="print the ssh command instead of running it")
        p.add_argument("ssh_args", nargs="*", metavar="-- ARGS", help="passed to ssh after the host (options, command)")
        p.set_defaults(func=cmd_ssh, passthrough="ssh_args")

    def add_apply_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ssh-host", help="host SSH clients use for the VM (default: the last one applied, "
                                               "else the agent address's host)")
        parser.add_argument("--ssh-port", type=_port,
                            help="the VM's SSH port (default: the last one applied, else 22)")

    def apply_options(self, store: Store, vm: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
        from imprint.backends.ssh.owner import resolve_target

        host, port = resolve_target(store, vm, address, args.ssh_host, args.ssh_port)
        return {"ssh_host": host, "ssh_port": port}

    def add_ca_options(self, parser: argparse.ArgumentParser) -> None:
        """None: the SSH CA is what ``imprint ca init`` makes when no other CA's option is given."""

    def ca_init(self, home: OwnerHome, args: argparse.Namespace, *, default: bool
                ) -> tuple[dict[str, Any], list[str]] | None:
        if not default:
            return None
        from imprint.backends.ssh.owner import ca_init, ca_key_file

        public, created = ca_init(home)
        verb = "created" if created else "already exists"
        key = ca_key_file(home)
        return ({"ssh_ca_key": str(key), "ssh_ca_public_key": public, "created": created},
                [f"SSH CA {verb}: {key}", public])


CLI = SshCli()
