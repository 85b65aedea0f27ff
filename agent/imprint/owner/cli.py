"""imprint: the owner's command line.

Exit codes: 0 success; 1 an internal error, or a local file or the database that cannot be used
(one line; the traceback with --debug); 2 bad usage or malformed input; 3 authentication failed
(possible man in the middle, wrong or reused token); 4 agent unreachable or timed out; 5 a profile
reached the VM but a backend failed there (the others ran); 130 interrupted.

Output: much of what is printed comes from the VM (status fields, backend summaries, the
agent's error texts, alert details), and a compromised VM would send terminal escape sequences.
Every text line goes through :func:`_out` / :func:`_err`, which render it with
:func:`imprint.safetext.printable`; JSON output is ``json.dumps`` with ``ensure_ascii``, where
every control character is a ``\\u`` escape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imprint import lastresort, tokens
from imprint.owner.errors import ApplyFailed, OwnerError, UsageError
from imprint.owner.home import OwnerHome, default_home
from imprint.safetext import ascii_number, printable

if TYPE_CHECKING:
    from imprint.backends.plugin import Backend, OwnerCli
    from imprint.owner.api import Binding, Owner
    from imprint.owner.store import PinRow, Store

Printer = Callable[[str], None]
PROG = "imprint"
LINE_LIMIT = 4000
# Commands that take nothing from a backend: they skip loading the backends' command-line hooks
# (importlib.metadata and every plugin's declaration, tens of milliseconds on each run).
CORE_ONLY = frozenset({"init", "key", "token", "status", "list", "audit", "serve", "resolve", "release", "transfer",
                       "import", "grant", "revoke"})


def _out(line: str) -> None:
    """The one way a text line reaches stdout."""
    print(printable(line, LINE_LIMIT))


def _err(line: str) -> None:
    """The one way a text line reaches stderr."""
    print(f"{PROG}: {printable(line, LINE_LIMIT)}", file=sys.stderr)


def _json(data: object, *, indent: int | None = 2) -> None:
    # default=str: a value the VM sent in a type JSON cannot hold still prints, as text.
    print(json.dumps(data, indent=indent, sort_keys=True, ensure_ascii=True, default=str))


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        _json(data)
    else:
        for line in lines:
            _out(line)


def _valid_name(name: str) -> str:
    from imprint.owner.names import valid_vm_name

    return valid_vm_name(name)


def _owner(home: OwnerHome) -> Owner:
    from imprint.owner.api import Owner

    return Owner(home.dir)


def cmd_init(home: OwnerHome, args: argparse.Namespace) -> int:
    passphrase = None
    if args.passphrase:  # read here (file, credential or terminal), never from an argument
        from imprint.owner import keyfile

        passphrase = keyfile.passphrase(home.key_file, new=not (home.initialised and home.encrypted))
    identity = _owner(home).init(passphrase)
    verb = "created" if identity.created else "already exists"
    lines = [f"owner identity {verb} in {identity.home}", f"owner key: {identity.owner_fingerprint}"]
    if identity.encrypted_now:
        lines.append("owner.key encrypted in place with the passphrase (copies of the old unencrypted file, "
                     "such as backups, are not)")
    elif identity.encrypted:
        lines.append("owner.key is encrypted with a passphrase")
    _emit(args, {"home": str(identity.home), "owner_fingerprint": identity.owner_fingerprint,
                 "created": identity.created, "encrypted": identity.encrypted,
                 "encrypted_now": identity.encrypted_now}, lines)
    return 0


def cmd_key_export(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint import crypto
    from imprint.fsatomic import write_all
    from imprint.owner import keyfile

    out: Path = args.out
    reused = home.initialised and home.encrypted
    data = home.exported_key(lambda: keyfile.passphrase(out, new=True))
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"--out {out} exists: refusing to overwrite it") from None
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fingerprint = crypto.fingerprint(crypto.certificate_spki(home.cert_file.read_bytes()))
    how = ("the home's own encrypted owner.key: its passphrase opens it" if reused
           else "encrypted with the passphrase just given")
    _emit(args, {"out": str(out), "owner_fingerprint": fingerprint, "reused_home_encryption": reused},
          [f"owner key {fingerprint} written to {out} ({how})",
           f"restore it into a new home with: imprint --home DIR key import {out}"])
    return 0


def cmd_key_import(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.boundedio import InputError, read_file
    from imprint.owner import keyfile

    try:
        data = read_file(Path(args.file), keyfile.MAX_FILE, follow_links=True)
    except InputError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if data is None:
        raise UsageError(f"{args.file}: no such file")
    key = home.import_key(data, lambda: keyfile.passphrase(Path(args.file), new=False))
    _emit(args, {"home": str(home.dir), "owner_fingerprint": key.public.fingerprint, "encrypted": True},
          [f"owner identity imported into {home.dir}", f"owner key: {key.public.fingerprint}",
           "owner.key is encrypted with the export's passphrase"])
    return 0


def cmd_token_new(home: OwnerHome, args: argparse.Namespace) -> int:
    issued = _owner(home).issue_token(args.name, args.mode)
    if issued.mode is tokens.Mode.SHARED:
        note = ("secret and single-use: give it to the site over a confidential channel, for a boot channel "
                "only root can read in the VM (fw_cfg, credentials, metadata disk, seed), not the kernel command line")
    else:
        note = "not secret: it is the hash of your owner key; the site needs integrity only"
    _emit(args, {"vm": issued.vm, "mode": issued.mode.value, "token_id": issued.token_id, "token": issued.text},
          [f"{issued.mode.value} token for {issued.vm} (id {issued.token_id}; {note})",
           "the site builds the boot-channel artefact with: imprint-site seed --channel NAME --token-file FILE",
           issued.text])
    return 0


def _apply_options(home: OwnerHome, name: str, address: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """What the backends' command-line options (``--ssh-host`` ...) give their owner halves."""
    store = home.store()
    try:
        if address is None:
            pin = store.pin(name)
            address = pin.address if pin is not None else None
        options: dict[str, Any] = {}
        if address is not None:
            for _, hook in _backend_clis():
                options.update(hook.apply_options(store, name, address, args))
        return options
    finally:
        store.close()


def _backend_clis() -> list[tuple[Backend, OwnerCli]]:
    """The installed backends' command-line hooks, by name (imprint.backends.plugin.OwnerCli).
    A backend that cannot be loaded adds nothing here; a profile naming it is refused with why."""
    from imprint import backends

    found = []
    for name in sorted(backends.registered()):
        try:
            backend = backends.find(name)
        except backends.BackendError:
            continue
        if backend is not None and backend.cli is not None:
            found.append((backend, backend.cli()))
    return found


def _binding_lines(binding: Binding) -> tuple[dict[str, Any], list[str]]:
    lines = [f"bound {binding.vm} at {binding.address} ({binding.mode.value} mode)",
             f"  VM key:    {binding.vm_fingerprint}", f"  owner key: {binding.owner_fingerprint}", "proved:"]
    lines += [f"  - {item}" for item in binding.proved]
    data: dict[str, Any] = {"vm": binding.vm, "address": binding.address, "mode": binding.mode.value,
                            "vm_fingerprint": binding.vm_fingerprint, "owner_fingerprint": binding.owner_fingerprint,
                            "proved": list(binding.proved), "status": dict(binding.status)}
    return data, lines


def cmd_bind(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.owner.api import Binding
    from imprint.owner.apply import ApplyReport

    if args.source is not None:
        return _bind_fleet(home, args)
    owner = _owner(home)
    if args.address is None:  # the VM dials the owner's listener: it binds there
        if args.vm_token is None or args.profile is not None:
            raise UsageError("bind without --address is for a no-secrets VM that dials `imprint serve`: give "
                             "--vm-token (and no --profile: apply it once bound)")
        record = owner.give_vm_token(args.name, args.vm_token)
        line = (f"bound {record.vm} (dialled in): VM key {record.vm_fingerprint}" if record.state == "bound"
                else f"VM token recorded for {record.vm}: `imprint serve` binds it when it dials")
        _emit(args, {"vm": record.vm, "state": record.state, "vm_fingerprint": record.vm_fingerprint,
                     "address": record.address}, [line])
        return 0
    if args.profile is None:
        data, lines = _binding_lines(owner.bind(args.name, args.address, args.vm_token))
        _emit(args, data, lines)
        return 0
    options = _apply_options(home, _valid_name(args.name), args.address, args)
    try:
        binding = owner.bind(args.name, args.address, args.vm_token, profile=args.profile, options=options)
    except OwnerError as exc:
        if not isinstance(exc.binding, Binding):
            raise  # nothing was bound
        data, lines = _binding_lines(exc.binding)
        report = exc.report if isinstance(exc, ApplyFailed) else None
        if isinstance(report, ApplyReport):  # a backend failed in the VM; the others ran
            data["apply"] = report.to_json()
            _emit(args, data, [*lines, *report.lines()])
        else:
            data["apply"] = {"error": str(exc), "exit_code": exc.exit_code, "kind": type(exc).__name__}
            _emit(args, data, [*lines, f"bound, but applying the profile failed: {exc}"])
        return exc.exit_code
    data, lines = _binding_lines(binding)
    assert binding.applied is not None
    data["apply"] = binding.applied.to_json()
    _emit(args, data, [*lines, *binding.applied.lines()])
    return 0


def _bind_fleet(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.owner import fleet
    from imprint.owner.progress import JsonLines, ProgressBar

    if args.name is not None or args.address is not None or args.vm_token is not None or args.profile is not None:
        raise UsageError("bind --from reads each VM's name, address and VM token from the file; "
                         "give none of NAME, --address, --vm-token or --profile with it")
    requests = fleet.read_requests(_read_source(args.source), name=args.name_pattern, source=f"--from {args.source}")
    owner = _owner(home)
    owner.home.load_key()  # no identity: one clear error, not one per VM
    to_terminal = not args.json and sys.stdout.isatty()
    display: JsonLines | ProgressBar = ProgressBar(sys.stdout, len(requests)) if to_terminal else JsonLines(sys.stdout)
    stop = threading.Event()
    with _stopping_on_signals(stop):
        summary = owner.bind_many(requests, parallel=args.parallel, on_progress=display.result, stop=stop)
    display.summary(summary)
    return summary.exit_code


def _read_source(source: str) -> str:
    from imprint.boundedio import InputError, read_file
    from imprint.owner.fleet import MAX_INPUT

    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            found = read_file(Path(source), MAX_INPUT, follow_links=True)
            if found is None:
                raise UsageError(f"--from {source}: no such file")
            data = found
        return data.decode()
    except InputError as exc:
        raise UsageError(f"--from {source}: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--from {source}: not UTF-8 text") from None


@contextlib.contextmanager
def _stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set ``stop``: no new bind starts, those under way end (each within
    its deadline), so every VM is bound or untouched. A second signal changes nothing more."""
    def handler(signum: int, frame: object) -> None:
        if not stop.is_set():
            _err(f"{signal.Signals(signum).name}: starting no new bind; waiting for those under way")
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _bound_pin(store: Store, name: str) -> PinRow:
    from imprint.owner.api import bound_pin

    return bound_pin(store, name)


def cmd_apply(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.owner.apply import ApplyReport

    owner = _owner(home)
    name = _valid_name(args.name)
    owner.bound_pin(name)
    options = _apply_options(home, name, args.address, args)
    try:
        report = owner.apply(name, args.profile, address=args.address, options=options)
    except ApplyFailed as exc:
        if not isinstance(exc.report, ApplyReport):
            raise
        report = exc.report
    _emit(args, report.to_json(), report.lines())
    return 0 if report.ok else ApplyFailed.exit_code


def cmd_ca_init(home: OwnerHome, args: argparse.Namespace) -> int:
    """The CA whose backend's options were given, else the default backend's."""
    hooks = _backend_clis()
    for default in (False, True):
        for backend, hook in hooks:
            if backend.default_ca == default and (made := hook.ca_init(home, args, default=default)) is not None:
                _emit(args, *made)
                return 0
    raise UsageError("no backend installed here makes a CA")


def cmd_status(home: OwnerHome, args: argparse.Namespace) -> int:
    status = _owner(home).status(args.name, address=args.address)
    raw = status.raw
    _emit(args, {"vm": status.vm, "address": status.address, **raw},
          [f"{status.vm} at {status.address}: {raw.get('state')} ({raw.get('mode')} mode), pinned mutual TLS verified",
           f"  VM key:    {raw.get('vm_fingerprint')}", f"  owner key: {raw.get('owner_fingerprint')}",
           f"  agent {raw.get('agent_version')}, up {raw.get('uptime_seconds')} s"])
    return 0


def _listen_address(text: str) -> tuple[str, int]:
    from imprint.owneraddr import OwnerAddressError, parse

    try:
        address = parse(text)
    except OwnerAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return address.host, address.port


def cmd_serve(home: OwnerHome, args: argparse.Namespace) -> int:
    import signal

    from imprint.guest.notify import notify, notify_status
    from imprint.owner.serve import Listener

    owner = _owner(home)
    owner.home.load_key()
    try:
        listener = Listener(owner, args.listen, on_change=lambda status: None if notify_status(status) else None)
    except OSError as exc:
        raise OwnerError(f"cannot listen: {lastresort.describe(exc)}") from None

    def stop(signum: int, frame: object) -> None:
        listener.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _err(f"imprint serve: listening on {', '.join(listener.addresses)} (owner key "
         f"{owner.home.load_key().public.fingerprint}; up to {listener.descriptors} descriptors)")
    notify("READY=1")
    listener.serve_forever()
    notify("STOPPING=1")
    return 0


def cmd_release(home: OwnerHome, args: argparse.Namespace) -> int:
    _owner(home).release(_valid_name(args.name), wipe=args.wipe)
    _emit(args, {"vm": args.name, "released": True, "wiped": args.wipe},
          [f"{args.name} released: it forgot this owner{' and its own key' if args.wipe else ''}; "
           "a new token on its next boot binds it again"])
    return 0


def cmd_transfer(home: OwnerHome, args: argparse.Namespace) -> int:
    fingerprint = _owner(home).transfer(_valid_name(args.name), args.to_cert, args.out,
                                        owner_addresses=args.owner_addresses)
    _emit(args, {"vm": args.name, "owner_fingerprint": fingerprint, "handover": str(args.out)},
          [f"{args.name} now trusts owner {fingerprint} only; give them {args.out} for `imprint import`"])
    return 0


def cmd_grant(home: OwnerHome, args: argparse.Namespace) -> int:
    fingerprint = _owner(home).grant(_valid_name(args.name), args.to, args.role, args.out)
    _emit(args, {"vm": args.name, "delegate": fingerprint, "role": args.role, "grant": str(args.out)},
          [f"{args.name}: {fingerprint} may now reach it as {args.role}; give them {args.out} for `imprint import`"])
    return 0


def cmd_revoke(home: OwnerHome, args: argparse.Namespace) -> int:
    fingerprint = _owner(home).revoke(_valid_name(args.name), args.principal)
    _emit(args, {"vm": args.name, "revoked": fingerprint}, [f"{args.name}: {fingerprint} is refused from now on"])
    return 0


def cmd_import(home: OwnerHome, args: argparse.Namespace) -> int:
    record = _owner(home).import_handover(args.file)
    _emit(args, {"vm": record.vm, "state": record.state, "vm_fingerprint": record.vm_fingerprint,
                 "address": record.address}, [f"{record.vm} imported: VM key {record.vm_fingerprint}, bound"])
    return 0


def cmd_resolve(home: OwnerHome, args: argparse.Namespace) -> int:
    cleared = _owner(home).resolve(_valid_name(args.name))
    _emit(args, {"vm": args.name, "cleared": cleared},
          [f"{args.name}: the {cleared} flag is cleared; the next session's counter is taken as the VM's"
           if cleared else f"{args.name} is not flagged"])
    return 0


def cmd_list(home: OwnerHome, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [
        {"vm": r.vm, "state": r.state, "mode": r.mode.value if r.mode else None, "token_state": r.token_state,
         "address": r.address, "vm_fingerprint": r.vm_fingerprint} for r in _owner(home).vms()]
    lines = [f"{'VM':<20} {'STATE':<9} {'MODE':<9} {'TOKEN':<10} {'ADDRESS':<22} VM KEY"]
    lines += [f"{r['vm']:<20} {r['state']:<9} {r['mode'] or '-':<9} {r['token_state'] or '-':<10} "
              f"{r['address'] or '-':<22} {r['vm_fingerprint'] or '-'}" for r in rows]
    _emit(args, {"vms": rows}, lines)
    return 0


def cmd_audit(home: OwnerHome, args: argparse.Namespace) -> int:
    entries = _owner(home).audit(args.name)
    lines = [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(e.at))} {e.vm} {e.action} "
             f"{e.address or '-'} {e.outcome}: {e.detail}" for e in entries]
    _emit(args, {"audit": [e.__dict__ for e in entries]}, lines)
    return 0


def _positive(value: str) -> int:
    if not ascii_number(value, 4) or not 1 <= int(value) <= 1024:
        raise argparse.ArgumentTypeError(f"{value[:20]!r} is not a number from 1 to 1024")
    return int(value)


def _build_parser(*, with_backends: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser = argparse.ArgumentParser(prog=PROG, description="Bind VMs to their owner without trusting the site.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    parser.add_argument("--home", type=Path, help="owner state directory (default $IMPRINT_HOME or "
                                                    "$XDG_DATA_HOME/imprint)")
    sub = parser.add_subparsers(dest="command", required=True)
    hooks = _backend_clis() if with_backends else []
    p = sub.add_parser("init", parents=[common], help="create the owner identity (once)")
    p.add_argument("--passphrase", action="store_true",
                   help="encrypt owner.key with a passphrase (asked on the terminal, or read from the file "
                        "named by IMPRINT_PASSPHRASE_FILE); an existing unencrypted key is encrypted in place")
    p.set_defaults(func=cmd_init)
    keys = sub.add_parser("key", help="the owner key: backup and restore").add_subparsers(dest="key_command",
                                                                                          required=True)
    p = keys.add_parser("export", parents=[common], help="write the owner key, encrypted, for a backup")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="a new file (never overwritten)")
    p.set_defaults(func=cmd_key_export)
    p = keys.add_parser("import", parents=[common], help="install an exported owner key into a new home")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_key_import)
    tok = sub.add_parser("token", help="make tokens").add_subparsers(dest="token_command", required=True)
    p = tok.add_parser("new", parents=[common], help="make a token for a VM; printed alone on the last line")
    p.add_argument("name")
    p.add_argument("--mode", choices=[mode.value for mode in tokens.Mode], required=True)
    p.set_defaults(func=cmd_token_new)
    p = sub.add_parser("bind", parents=[common], help="run the key exchange with a booted VM and pin its key")
    p.add_argument("name", nargs="?")
    p.add_argument("--address", help="HOST:PORT of the agent")
    p.add_argument("--vm-token", help="no-secrets mode: the VM token the site relayed back")
    p.add_argument("--profile", type=Path, help="apply this profile (TOML) right after a successful bind")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="bind many VMs: JSON lines {name, address, vm_token} or imprint-site boot records; - is stdin")
    p.add_argument("--name", dest="name_pattern", metavar="NAME",
                   help="with --from: the name of a record that has none ({n}: its number)")
    p.add_argument("--parallel", type=_positive, metavar="N",
                   help="with --from: binds at a time (default: 8 per CPU, 4 to 64)")
    for _, hook in hooks:
        hook.add_apply_options(p)
    p.set_defaults(func=cmd_bind)
    p = sub.add_parser("status", parents=[common], help="ask a bound VM over the pinned channel")
    p.add_argument("name")
    p.add_argument("--address", help="HOST:PORT if the VM moved (default: the address it was bound at)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("apply", parents=[common], help="apply a profile to a bound VM over the pinned channel")
    p.add_argument("name")
    p.add_argument("--profile", type=Path, required=True, help="what the VM gets (TOML; see docs/backends.md)")
    p.add_argument("--address", help="HOST:PORT if the VM moved (default: the address it was bound at)")
    for _, hook in hooks:
        hook.add_apply_options(p)
    p.set_defaults(func=cmd_apply)
    ca = sub.add_parser("ca", help="the owner's certificate authorities").add_subparsers(dest="ca_command",
                                                                                         required=True)
    p = ca.add_parser("init", parents=[common], help="create the owner's CA once (the default backend's; "
                                                     "an option names another)")
    for _, hook in hooks:
        hook.add_ca_options(p)
    p.set_defaults(func=cmd_ca_init)
    p = sub.add_parser("serve", help="listen for VMs that dial their owner: bind them, keep their connections")
    p.add_argument("--listen", action="append", required=True, type=_listen_address, metavar="HOST:PORT",
                   help="where VMs dial (repeat for more); give the same address to the site (seed --owner)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("release", parents=[common], help="make a bound VM forget this owner (a new token binds it)")
    p.add_argument("name")
    p.add_argument("--wipe", action="store_true", help="the VM also forgets its own key (a new identity)")
    p.set_defaults(func=cmd_release)
    p = sub.add_parser("transfer", parents=[common], help="hand a bound VM to another owner, over the pinned channel")
    p.add_argument("name")
    p.add_argument("--to", dest="to_cert", type=Path, required=True, metavar="CERT",
                   help="the new owner's certificate (their owner.crt)")
    p.add_argument("--out", type=Path, required=True, help="the handover file for the new owner's `imprint import`")
    p.add_argument("--owner", dest="owner_addresses", action="append", metavar="HOST:PORT",
                   help="where the VM dials the new owner (repeatable; default: it dials nobody)")
    p.set_defaults(func=cmd_transfer)
    p = sub.add_parser("grant", parents=[common], help="let another principal reach a VM with its own key, in a role")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="CERT", help="their certificate (their owner.crt)")
    p.add_argument("--role", required=True, choices=["read", "operator", "admin"])
    p.add_argument("--out", type=Path, required=True, help="the grant file for their `imprint import`")
    p.set_defaults(func=cmd_grant)
    p = sub.add_parser("revoke", parents=[common], help="take a grant back: the VM refuses that key")
    p.add_argument("name")
    p.add_argument("--from", dest="principal", required=True, metavar="CERT_OR_FINGERPRINT")
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser("import", parents=[common], help="take over a VM transferred to you, or take up a grant")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("resolve", parents=[common], help="clear a VM's cloned/rolled-back flag once you decided")
    p.add_argument("name")
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("list", parents=[common], help="list VMs and their state")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("audit", parents=[common], help="show the append-only log of bind attempts")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_audit)
    for _, hook in hooks:
        hook.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after "--" goes untouched to a command that takes it (a backend's, such as
    # `imprint ssh`, names the argument in ``passthrough``); argparse's subparsers mangle "--".
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = _build_parser(with_backends=_command_word(argv) not in CORE_ONLY)
    args = parser.parse_args(argv)
    if args.command == "bind" and args.source is None and (args.name is None or (args.address is None
                                                                                and args.vm_token is None)):
        parser.error("bind: give NAME and --address HOST:PORT, or NAME and --vm-token (a VM that dials "
                     "`imprint serve`), or --from FILE")
    if passthrough:
        dest = getattr(args, "passthrough", None)
        if dest is None:
            parser.error(f"'--' passes arguments to a command that takes them, not to `{PROG} {args.command}`")
        setattr(args, dest, [*getattr(args, dest), *passthrough])
    lastresort.set_debug(args.debug)
    lastresort.robust_streams()
    lastresort.install_hooks(_err)
    return lastresort.run_main(lambda: _run(args), _err)


def _command_word(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (skipping the top-level options), if any."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _run(args: argparse.Namespace) -> int:
    home = OwnerHome(args.home or default_home())
    os.umask(0o077)
    as_json = getattr(args, "json", False)
    try:
        code: int = args.func(home, args)
        return code
    except OwnerError as exc:
        return _fail(as_json, str(exc), exc.exit_code, type(exc).__name__)
    except tokens.TokenError as exc:
        return _fail(as_json, str(exc), UsageError.exit_code, "UsageError")
    except sqlite3.Error as exc:
        # A database that is not one, is locked by a crashed writer's journal, or was damaged.
        return _fail(as_json, f"the owner database {home.db_file} cannot be used: {exc}", OwnerError.exit_code,
                     "DatabaseError")
    except BrokenPipeError:
        raise  # the reader of stdout went away: lastresort ends it quietly
    except OSError as exc:
        return _fail(as_json, lastresort.describe(exc), OwnerError.exit_code, "OSError")


def _fail(as_json: bool, message: str, code: int, kind: str) -> int:
    if as_json:
        _json({"error": message, "exit_code": code, "kind": kind}, indent=None)
    _err(f"error: {message}")
    return code


# For the commands backends add (imprint.backends.plugin.OwnerCli): the same checks and output.
valid_name = _valid_name
bound_pin = _bound_pin
out = _out


if __name__ == "__main__":
    sys.exit(main())
