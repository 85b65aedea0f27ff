"""imprint-site: what a site runs to hand a VM its token and to relay the VM token back.

    imprint-site seed --channel NAME --token T --out PATH     build the channel artefact
    imprint-site reverse --from console.log|disk.img          print the VM token
    imprint-site boot --image IMG --channel NAME --token T    boot a QEMU VM with the token (JSON out)
    imprint-site attach RUN_DIR --channel NAME --token T      hot-plug a token disk into that VM
    imprint-site stop RUN_DIR [--graceful]                    stop that VM

Exit codes: 0 success; 1 no VM token found yet, or the VM failed / timed out; 2 bad usage or
malformed input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from imprint import tokens
from imprint.site import reverse, seeds, vm


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imprint-site", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seed", help="build the artefact that carries a token on one boot channel")
    p.add_argument("--channel", required=True, choices=sorted(seeds.BUILDERS))
    token_source = p.add_mutually_exclusive_group(required=True)
    token_source.add_argument("--token", help="the owner's token (visible in argv: prefer --token-file for K)")
    token_source.add_argument("--token-file", type=Path, help="read the token from this file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("reverse", help="extract the VM token from a console log or metadata disk")
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("boot", help="boot a QEMU VM from an image with the token on one channel; prints JSON")
    p.add_argument("--image", type=Path, help="the base qcow2 (never written: the VM runs on an overlay)")
    p.add_argument("--kernel", type=Path, help="default: vmlinuz next to the image")
    p.add_argument("--initrd", type=Path, help="default: initrd.img next to the image")
    p.add_argument("--channel", help=f"boot channel artefact: {', '.join(sorted(seeds.BUILDERS))}; omit for no token")
    token_source = p.add_mutually_exclusive_group()
    token_source.add_argument("--token", help="the owner's token (visible in argv: prefer --token-file for K)")
    token_source.add_argument("--token-file", type=Path)
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

    p = sub.add_parser("attach", help="hot-plug a token disk into a running VM")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--channel", required=True, choices=list(vm.HOTPLUG_CHANNELS))
    token_source = p.add_mutually_exclusive_group(required=True)
    token_source.add_argument("--token")
    token_source.add_argument("--token-file", type=Path)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--no-wait", action="store_true")

    p = sub.add_parser("wait-ssh", help="wait until the VM's sshd answers on its forwarded port; prints JSON")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("stop", help="stop the VM of a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--graceful", action="store_true", help="ACPI power-down first (a clean guest shutdown)")
    return parser


def _seed(args: argparse.Namespace) -> int:
    text = args.token if args.token is not None else args.token_file.read_text().strip()
    try:
        token = tokens.parse(text)
    except tokens.TokenError as exc:
        print(f"imprint-site: error: --token: {exc}", file=sys.stderr)
        return 2
    if token.kind is tokens.TokenKind.VM:
        print("imprint-site: error: --token: a VM token goes to the owner, not onto the VM's boot channel",
              file=sys.stderr)
        return 2
    try:
        artefact = seeds.build(args.channel, token.encode(), args.out)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"imprint-site: error: cannot build the {args.channel} artefact at {args.out}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"channel": artefact.channel, "path": str(artefact.path), "qemu_args": artefact.qemu_args,
                          "kernel_cmdline": artefact.kernel_cmdline, "note": artefact.note}, indent=2))
    else:
        print(f"{artefact.channel}: wrote {artefact.path}")
        if artefact.kernel_cmdline:
            print(f"  kernel command line: {artefact.kernel_cmdline}")
        if artefact.qemu_args:
            print(f"  qemu arguments: {' '.join(artefact.qemu_args)}")
        if artefact.note:
            print(f"  note: {artefact.note}")
    return 0


def _reverse(args: argparse.Namespace) -> int:
    try:
        token = reverse.extract(args.source)
    except reverse.ReverseError as exc:
        print(f"imprint-site: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"vm_token": token.encode()}))
    else:
        print(token.encode())
    return 0


def _token_arg(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        return str(args.token)
    if args.token_file is not None:
        return str(args.token_file.read_text().strip())
    return None


def _print_record(record: vm.BootRecord) -> int:
    print(json.dumps(asdict(record), indent=2))
    if record.status in ("failed", "timeout"):
        print(f"imprint-site: the VM {record.status}: {record.detail} (console: {record.console})", file=sys.stderr)
        return 1
    return 0


def _boot(args: argparse.Namespace) -> int:
    import tempfile

    token = _token_arg(args)
    if token is not None:
        try:
            parsed = tokens.parse(token)
        except tokens.TokenError as exc:
            print(f"imprint-site: error: --token: {exc}", file=sys.stderr)
            return 2
        if args.mode and parsed.kind is not tokens.TokenKind.VM and parsed.mode.value != args.mode:
            print(f"imprint-site: error: --mode {args.mode}, but the token is a {parsed.mode.value}-mode token",
                  file=sys.stderr)
            return 2
    if args.image is None and args.reuse_disk is None:
        print("imprint-site: error: --image (or --reuse-disk) is required", file=sys.stderr)
        return 2
    near = (args.image or args.reuse_disk).resolve().parent
    if args.reuse_disk is not None and args.image is None:
        near = Path(vm.BootRecord.load(args.reuse_disk.resolve().parent).image or near).parent
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="imprint-vm-"))
    try:
        record = vm.boot(image=args.image, kernel=args.kernel or near / "vmlinuz",
                         initrd=args.initrd or near / "initrd.img", run_dir=run_dir, channel=args.channel,
                         token=token, accel=args.accel, memory_mib=args.memory, cpus=args.cpus, append=args.append,
                         reuse_disk=args.reuse_disk)
    except (vm.SiteError, tokens.TokenError, OSError, subprocess.SubprocessError) as exc:
        print(f"imprint-site: error: {exc}", file=sys.stderr)
        return 2
    print(f"imprint-site: {record.accel_note}", file=sys.stderr)
    if not args.no_wait:
        record = vm.follow(record, timeout=args.timeout)
    return _print_record(record)


def _attach(args: argparse.Namespace) -> int:
    token = _token_arg(args)
    assert token is not None
    try:
        vm.attach(args.run_dir, args.channel, token)
    except (vm.SiteError, tokens.TokenError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"imprint-site: error: {exc}", file=sys.stderr)
        return 2
    record = vm.BootRecord.load(args.run_dir)
    if not args.no_wait:
        record = vm.follow(record, timeout=args.timeout, until=("ready", "failed"))
    return _print_record(record)


def _wait_ssh(args: argparse.Namespace) -> int:
    try:
        record = vm.BootRecord.load(args.run_dir)
        seconds = vm.wait_sshd(record, timeout=args.timeout)
    except (vm.SiteError, OSError, ValueError) as exc:
        print(f"imprint-site: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": str(args.run_dir), "ssh_address": record.ssh_address,
                      "seconds_to_sshd": seconds}))
    return 0


def _stop(args: argparse.Namespace) -> int:
    try:
        how = vm.stop(args.run_dir, graceful=args.graceful)
    except vm.SiteError as exc:
        print(f"imprint-site: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": str(args.run_dir), "stopped": how}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handlers = {"seed": _seed, "reverse": _reverse, "boot": _boot, "attach": _attach, "wait-ssh": _wait_ssh,
                "stop": _stop}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
