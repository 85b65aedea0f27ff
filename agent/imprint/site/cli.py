"""imprint-site: what a site runs to hand a VM its token and to relay the VM token back.

    imprint-site seed --channel NAME --token T --out PATH     build the channel artefact
    imprint-site reverse --from console.log|disk.img          print the VM token

Exit codes: 0 success; 1 no VM token found yet; 2 bad usage or malformed input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from imprint import tokens
from imprint.site import reverse, seeds


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


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "seed":
        return _seed(args)
    return _reverse(args)


if __name__ == "__main__":
    sys.exit(main())
