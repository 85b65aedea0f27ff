"""imprint-site: what a site runs to hand a VM its token and to relay the VM token back.

    imprint-site seed --channel NAME --token T --out PATH     build the channel artefact
                      [--owner HOST:PORT ...]                 (with the owner addresses beside the token)
    imprint-site reverse --from console.log|disk.img          print the VM token
    imprint-site boot --image IMG --channel NAME --token T    boot a QEMU VM with the token (JSON out)
    imprint-site attach RUN_DIR --channel NAME --token T      hot-plug a token disk into that VM
    imprint-site stop RUN_DIR [--graceful]                    stop that VM

Exit codes: 0 success; 1 no VM token found yet, or the VM failed / timed out, or an internal
error (one line; the traceback with --debug); 2 bad usage or malformed input; 130 interrupted.

Every line printed goes through :func:`imprint.safetext.printable` (console text, agent
messages and file names come from the VM or the file system); JSON stays JSON, with escapes.
A shared-mode token (K) is never printed: the artefact file carries it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from imprint import lastresort, owneraddr, tokens
from imprint.safetext import printable
from imprint.site import reverse, seeds, vm

PROG = "imprint-site"
LINE_LIMIT = 4000


class UsageError(Exception):
    """Bad usage or malformed input (exit 2); the message says what."""


def _out(line: str) -> None:
    print(printable(line, LINE_LIMIT))


def _err(line: str) -> None:
    print(f"{PROG}: {printable(line, LINE_LIMIT)}", file=sys.stderr)


def _json(data: object, indent: int | None = 2) -> None:
    print(json.dumps(data, indent=indent))  # ensure_ascii: control characters become \u escapes




def _add_owner(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owner", action="append", default=[], metavar="HOST:PORT",
                        help="an owner address the VM dials, written beside the token (repeatable, or a "
                             "comma-separated list; IPv6 as [ADDRESS]:PORT)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seed", help="build the artefact that carries a token on one boot channel")
    p.add_argument("--channel", required=True, choices=sorted(seeds.ARTEFACTS))
    token_source = p.add_mutually_exclusive_group(required=True)
    token_source.add_argument("--token", help="the owner's token (visible in argv: prefer --token-file for K)")
    token_source.add_argument("--token-file", type=Path, help="read the token from this file")
    p.add_argument("--out", type=Path, required=True)
    _add_owner(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("reverse", help="extract the VM token from a console log or metadata disk")
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--for", dest="answers", metavar="OWNER_TOKEN_ID",
                   help="accept only an announcement answering this owner token id (16 hex digits, as "
                        "`imprint token new` prints it)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("boot", help="boot a QEMU VM from an image with the token on one channel; prints JSON")
    p.add_argument("--image", type=Path, help="the base qcow2 (never written: the VM runs on an overlay)")
    p.add_argument("--kernel", type=Path, help="default: vmlinuz next to the image")
    p.add_argument("--initrd", type=Path, help="default: initrd.img next to the image")
    p.add_argument("--channel", help=f"boot channel artefact: {', '.join(sorted(seeds.ARTEFACTS))}; omit for no token")
    token_source = p.add_mutually_exclusive_group()
    token_source.add_argument("--token", help="the owner's token (visible in argv: prefer --token-file for K)")
    token_source.add_argument("--token-file", type=Path)
    _add_owner(p)
    p.add_argument("--mode", choices=["shared", "nosecret"], help="check the token is of this mode")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto: KVM if a bounded test boot works, else TCG (default)")
    p.add_argument("--run-dir", type=Path, help="where the overlay, artefacts, console.log, pid live (default: new)")
    p.add_argument("--reuse-disk", type=Path, help="boot this overlay again (a reboot of that VM) instead of a new one")
    p.add_argument("--memory", type=int, default=1024, help="MiB (default 1024)")
    p.add_argument("--cpus", type=int, default=1, choices=range(1, 65), metavar="N", help="vCPUs (default 1)")
    p.add_argument("--append", default="", help="more kernel command line")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the agent's status")
    p.add_argument("--no-wait", action="store_true", help="print the JSON right after QEMU started")
    p.add_argument("--no-agent-port", action="store_true",
                   help="forward no host port to the agent's 7443 (a VM that dials its owner needs none)")

    p = sub.add_parser("attach", help="hot-plug a token disk into a running VM")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--channel", required=True, choices=list(vm.HOTPLUG_CHANNELS))
    token_source = p.add_mutually_exclusive_group(required=True)
    token_source.add_argument("--token")
    token_source.add_argument("--token-file", type=Path)
    _add_owner(p)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--no-wait", action="store_true")

    p = sub.add_parser("wait-ssh", help="wait until the VM's sshd answers on its forwarded port; prints JSON")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("stop", help="stop the VM of a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--graceful", action="store_true", help="ACPI power-down first (a clean guest shutdown)")
    return parser


def _read_token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token", None) is not None:
        return str(args.token)
    if getattr(args, "token_file", None) is None:
        return None
    try:
        return str(args.token_file.read_text(encoding="ascii").strip())
    except OSError as exc:
        raise UsageError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--token-file {args.token_file}: not a token (not ASCII text)") from None


def _parse_token(text: str) -> tokens.Token:
    try:
        return tokens.parse(text)
    except tokens.TokenError as exc:
        raise UsageError(f"--token: {exc}") from None


def _owners(args: argparse.Namespace) -> tuple[owneraddr.OwnerAddress, ...]:
    """The --owner addresses, in order, duplicates dropped; a usage error when one is malformed."""
    values: list[str] = getattr(args, "owner", None) or []
    try:
        owners: list[owneraddr.OwnerAddress] = []
        for value in values:
            owners += [address for address in owneraddr.parse_list(value) if address not in owners]
        if len(owners) > owneraddr.MAX_ADDRESSES:
            raise owneraddr.OwnerAddressError(f"{len(owners)} owner addresses, more than {owneraddr.MAX_ADDRESSES}")
    except owneraddr.OwnerAddressError as exc:
        raise UsageError(f"--owner: {exc}") from None
    return tuple(owners)


def _failure(exc: Exception) -> UsageError:
    return UsageError(lastresort.describe(exc) if isinstance(exc, OSError) else str(exc))


def _seed(args: argparse.Namespace) -> int:
    text = _read_token(args)
    assert text is not None  # argparse requires --token or --token-file
    token = _parse_token(text)
    if token.kind is tokens.TokenKind.VM:
        raise UsageError("--token: a VM token goes to the owner, not onto the VM's boot channel")
    owners = _owners(args)
    try:
        artefact = seeds.build(args.channel, token.encode(), args.out, owners)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise UsageError(f"cannot build the {args.channel} artefact at {args.out}: {_failure(exc)}") from None
    # A kernel command line that carries K is named by its file, never printed.
    cmdline = artefact.kernel_cmdline
    shown = None if cmdline is None or token.is_secret else cmdline
    if args.json:
        _json({"channel": artefact.channel, "path": str(artefact.path), "qemu_args": artefact.qemu_args,
               "kernel_cmdline": shown, "kernel_cmdline_file": str(artefact.path) if cmdline else None,
               "note": artefact.note, "owners": [str(address) for address in owners]})
        return 0
    _out(f"{artefact.channel}: wrote {artefact.path}")
    if owners:
        _out(f"  owner addresses: {owneraddr.encode_list(owners)}")
    if cmdline is not None:
        _out(f"  kernel command line: {shown}" if shown is not None else
             f"  kernel command line: append the contents of {artefact.path} (it carries K: not printed)")
    if artefact.qemu_args:
        _out(f"  qemu arguments: {' '.join(artefact.qemu_args)}")
    if artefact.note:
        _out(f"  note: {artefact.note}")
    return 0


def _reverse(args: argparse.Namespace) -> int:
    if args.answers is not None and (len(args.answers) != 16 or not all(c in "0123456789abcdef"
                                                                        for c in args.answers)):
        raise UsageError("--for: an owner token id is 16 lowercase hex digits")
    try:
        token = reverse.extract(args.source, answers=args.answers)
    except reverse.ReverseError as exc:
        _err(str(exc))
        return 1
    if args.json:
        _json({"vm_token": token.encode()}, indent=None)
    else:
        _out(token.encode())
    return 0


def _print_record(record: vm.BootRecord) -> int:
    _json(asdict(record))
    if record.status in ("failed", "timeout"):
        _err(f"the VM {record.status}: {record.detail} (console: {record.console})")
        return 1
    return 0


def _boot(args: argparse.Namespace) -> int:
    import tempfile

    token = _read_token(args)
    owners = _owners(args)
    if owners and token is None:
        raise UsageError("--owner goes with --token or --token-file (the owner addresses belong to a token)")
    if token is not None:
        parsed = _parse_token(token)
        if args.mode and parsed.kind is not tokens.TokenKind.VM and parsed.mode.value != args.mode:
            raise UsageError(f"--mode {args.mode}, but the token is a {parsed.mode.value}-mode token")
    if args.image is None and args.reuse_disk is None:
        raise UsageError("--image (or --reuse-disk) is required")
    try:
        near = (args.image or args.reuse_disk).resolve().parent
        if args.reuse_disk is not None and args.image is None:
            near = Path(vm.BootRecord.load(args.reuse_disk.resolve().parent).image or near).parent
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="imprint-vm-"))
        record = vm.boot(image=args.image, kernel=args.kernel or near / "vmlinuz",
                         initrd=args.initrd or near / "initrd.img", run_dir=run_dir, channel=args.channel,
                         token=token, accel=args.accel, memory_mib=args.memory, cpus=args.cpus, append=args.append,
                         reuse_disk=args.reuse_disk, owners=owners, forward_agent=not args.no_agent_port)
    except (vm.SiteError, tokens.TokenError, OSError, subprocess.SubprocessError) as exc:
        raise _failure(exc) from None
    _err(record.accel_note)
    if not args.no_wait:
        record = vm.follow(record, timeout=args.timeout)
    return _print_record(record)


def _attach(args: argparse.Namespace) -> int:
    token = _read_token(args)
    assert token is not None  # argparse requires --token or --token-file
    owners = _owners(args)
    try:
        vm.attach(args.run_dir, args.channel, token, owners)
        record = vm.BootRecord.load(args.run_dir)
    except (vm.SiteError, tokens.TokenError, OSError, ValueError, subprocess.SubprocessError) as exc:
        raise _failure(exc) from None
    if not args.no_wait:
        record = vm.follow(record, timeout=args.timeout, until=("ready", "failed"))
    return _print_record(record)


def _wait_ssh(args: argparse.Namespace) -> int:
    try:
        record = vm.BootRecord.load(args.run_dir)
        seconds = vm.wait_sshd(record, timeout=args.timeout)
    except (vm.SiteError, OSError, ValueError) as exc:
        _err(f"error: {_failure(exc)}")
        return 1
    _json({"run_dir": str(args.run_dir), "ssh_address": record.ssh_address, "seconds_to_sshd": seconds},
          indent=None)
    return 0


def _stop(args: argparse.Namespace) -> int:
    try:
        how = vm.stop(args.run_dir, graceful=args.graceful)
    except (vm.SiteError, OSError) as exc:
        _err(f"error: {_failure(exc)}")
        return 1
    _json({"run_dir": str(args.run_dir), "stopped": how}, indent=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    lastresort.set_debug(args.debug)
    lastresort.robust_streams()
    lastresort.install_hooks(_err)
    handlers = {"seed": _seed, "reverse": _reverse, "boot": _boot, "attach": _attach, "wait-ssh": _wait_ssh,
                "stop": _stop}

    def body() -> int:
        try:
            return handlers[args.command](args)
        except UsageError as exc:
            _err(f"error: {exc}")
            return 2

    return lastresort.run_main(body, _err)


if __name__ == "__main__":
    sys.exit(main())
