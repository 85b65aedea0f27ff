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
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imprint import lastresort, tokens
from imprint.owner.errors import ApplyFailed, AuthenticationFailed, OwnerError, UsageError
from imprint.owner.home import OwnerHome, default_home
from imprint.safetext import printable

if TYPE_CHECKING:
    from imprint.backends.plugin import Backend, OwnerCli
    from imprint.owner.apply import ApplyContext
    from imprint.owner.store import PinRow, Store

Printer = Callable[[str], None]
PROG = "imprint"
LINE_LIMIT = 4000
# Commands that take nothing from a backend: they skip loading the backends' command-line hooks
# (importlib.metadata and every plugin's declaration, tens of milliseconds on each run).
CORE_ONLY = frozenset({"init", "token", "status", "list", "audit"})


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
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-.":
        raise UsageError(f"VM name '{name}' must be 1-64 letters, digits, '-', '_' or '.', not starting with - or .")
    return name


def cmd_init(home: OwnerHome, args: argparse.Namespace) -> int:
    key, created = home.init()
    verb = "created" if created else "already exists"
    _emit(args, {"home": str(home.dir), "owner_fingerprint": key.public.fingerprint, "created": created},
          [f"owner identity {verb} in {home.dir}", f"owner key: {key.public.fingerprint}"])
    return 0


def cmd_token_new(home: OwnerHome, args: argparse.Namespace) -> int:
    name = _valid_name(args.name)
    home.load_key()  # the owner identity comes first, in both modes
    store = home.store()
    pin = store.pin(name)
    if pin is not None and pin.state == "bound":
        raise UsageError(f"{name} is already bound to VM key {pin.vm_fingerprint}; a VM binds once")
    mode = tokens.Mode(args.mode)
    token = home.new_token(mode)
    if mode is tokens.Mode.SHARED:
        note = ("secret and single-use: give it to the site over a confidential channel, for a boot channel "
                "only root can read in the VM (fw_cfg, credentials, metadata disk, seed), not the kernel command line")
    else:
        note = "not secret: it is the hash of your owner key; the site needs integrity only"
    text = token.encode()
    store.issue_token(name, mode, token.token_id.hex(), text)
    _emit(args, {"vm": name, "mode": mode.value, "token_id": token.token_id.hex(), "token": text},
          [f"{mode.value} token for {name} (id {token.token_id.hex()}; {note})",
           "the site builds the boot-channel artefact with: imprint-site seed --channel NAME --token-file FILE",
           text])
    return 0


def _apply_context(home: OwnerHome, store: Store, name: str, address: str, args: argparse.Namespace) -> ApplyContext:
    from imprint.owner.apply import ApplyContext

    options: dict[str, Any] = {}
    for _, hook in _backend_clis():
        options.update(hook.apply_options(store, name, address, args))
    return ApplyContext(home=home, store=store, vm=name, address=address, options=options)


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


def cmd_bind(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.owner import apply as applying
    from imprint.owner.bind import bind

    name = _valid_name(args.name)
    store = home.store()
    plan = None
    if args.profile:
        # The whole profile is checked before the exchange: a bad profile must not spend the token.
        if not store.vm_exists(name):
            raise UsageError(f"unknown VM '{name}': make its token first with `imprint token new {name} --mode ...`")
        profile = applying.load_profile(args.profile)
        ctx = _apply_context(home, store, name, args.address, args)
        plan = (ctx, profile, applying.prepare(ctx, profile))
    result = bind(home, store, name, args.address, args.vm_token)
    lines = [f"bound {name} at {result.address} ({result.mode.value} mode)",
             f"  VM key:    {result.vm_fingerprint}", f"  owner key: {result.owner_fingerprint}", "proved:"]
    lines += [f"  - {item}" for item in result.proved]
    data: dict[str, Any] = {"vm": name, "address": result.address, "mode": result.mode.value,
                            "vm_fingerprint": result.vm_fingerprint, "owner_fingerprint": result.owner_fingerprint,
                            "proved": result.proved, "status": result.status}
    if plan is None:
        _emit(args, data, lines)
        return 0
    ctx, profile, first = plan
    pin = store.pin(name)
    assert pin is not None
    try:
        report = _run_apply(home, ctx, pin, profile, first)
    except OwnerError as exc:
        data["apply"] = {"error": str(exc), "exit_code": exc.exit_code, "kind": type(exc).__name__}
        _emit(args, data, [*lines, f"bound, but applying the profile failed: {exc}"])
        return exc.exit_code
    data["apply"] = report.to_json()
    _emit(args, data, [*lines, *report.lines()])
    return 0 if report.ok else ApplyFailed.exit_code


def _bound_pin(store: Store, name: str) -> PinRow:
    if not store.vm_exists(name):
        raise UsageError(f"unknown VM '{name}'")
    pin = store.pin(name)
    if pin is None or pin.state != "bound":
        raise UsageError(f"{name} is not bound yet: run `imprint bind {name} --address HOST:PORT`")
    return pin


def _run_apply(home: OwnerHome, ctx: ApplyContext, pin: PinRow, profile: dict[str, dict[str, Any]],
               first: dict[str, dict[str, Any]]) -> Any:
    from imprint.owner.apply import apply_profile
    from imprint.owner.client import PinnedClient

    client = PinnedClient(home, ctx.vm, pin.vm_cert, ctx.address)
    try:
        return apply_profile(ctx, client, profile, first)
    finally:
        client.close()


def cmd_apply(home: OwnerHome, args: argparse.Namespace) -> int:
    from imprint.owner import apply as applying

    name = _valid_name(args.name)
    store = home.store()
    pin = _bound_pin(store, name)
    ctx = _apply_context(home, store, name, args.address or pin.address, args)
    profile = applying.load_profile(args.profile)
    first = applying.prepare(ctx, profile)
    report = _run_apply(home, ctx, pin, profile, first)
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
    from imprint.owner.client import PinnedClient

    name = _valid_name(args.name)
    store = home.store()
    pin = _bound_pin(store, name)
    address = args.address or pin.address
    client = PinnedClient(home, name, pin.vm_cert, address)
    try:
        status = client.get("/v1/status")
    except OwnerError as exc:
        store.audit(name, "status", address, type(exc).__name__, str(exc))
        raise
    finally:
        client.close()
    owner_fp = home.load_key().public.fingerprint
    if status.get("vm_fingerprint") != pin.vm_fingerprint or status.get("owner_fingerprint") != owner_fp:
        store.audit(name, "status", address, "AuthenticationFailed", "the agent reports other keys than pinned")
        raise AuthenticationFailed(
            f"the agent at {address} reports VM key {status.get('vm_fingerprint')} and owner key "
            f"{status.get('owner_fingerprint')}; pinned are {pin.vm_fingerprint} and {owner_fp}"
        )
    if args.address and args.address != pin.address:
        store.update_address(name, args.address)
    _emit(args, {"vm": name, "address": address, **status},
          [f"{name} at {address}: {status.get('state')} ({status.get('mode')} mode), pinned mutual TLS verified",
           f"  VM key:    {status.get('vm_fingerprint')}", f"  owner key: {status.get('owner_fingerprint')}",
           f"  agent {status.get('agent_version')}, up {status.get('uptime_seconds')} s"])
    return 0


def cmd_list(home: OwnerHome, args: argparse.Namespace) -> int:
    store = home.store()
    rows: list[dict[str, Any]] = []
    for name in store.vm_names():
        pin, token = store.pin(name), store.current_token(name)
        rows.append({
            "vm": name,
            "state": pin.state if pin else "unbound",
            "mode": (pin.mode.value if pin else token.mode.value if token else None),
            "token_state": token.state if token else None,
            "address": pin.address if pin else None,
            "vm_fingerprint": pin.vm_fingerprint if pin else None,
        })
    lines = [f"{'VM':<20} {'STATE':<9} {'MODE':<9} {'TOKEN':<10} {'ADDRESS':<22} VM KEY"]
    lines += [f"{r['vm']:<20} {r['state']:<9} {r['mode'] or '-':<9} {r['token_state'] or '-':<10} "
              f"{r['address'] or '-':<22} {r['vm_fingerprint'] or '-'}" for r in rows]
    _emit(args, {"vms": rows}, lines)
    return 0


def cmd_audit(home: OwnerHome, args: argparse.Namespace) -> int:
    store = home.store()
    entries = store.audit_log(args.name)
    lines = [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(e.at))} {e.vm} {e.action} "
             f"{e.address or '-'} {e.outcome}: {e.detail}" for e in entries]
    _emit(args, {"audit": [e.__dict__ for e in entries]}, lines)
    return 0


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
    p.set_defaults(func=cmd_init)
    tok = sub.add_parser("token", help="make tokens").add_subparsers(dest="token_command", required=True)
    p = tok.add_parser("new", parents=[common], help="make a token for a VM; printed alone on the last line")
    p.add_argument("name")
    p.add_argument("--mode", choices=[mode.value for mode in tokens.Mode], required=True)
    p.set_defaults(func=cmd_token_new)
    p = sub.add_parser("bind", parents=[common], help="run the key exchange with a booted VM and pin its key")
    p.add_argument("name")
    p.add_argument("--address", required=True, help="HOST:PORT of the agent")
    p.add_argument("--vm-token", help="no-secrets mode: the VM token the site relayed back")
    p.add_argument("--profile", type=Path, help="apply this profile (TOML) right after a successful bind")
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
