"""The cloudinit backend: a cloud-config document from the owner, validated by cloud-init's own
schema validator and applied by cloud-init's own module runner. The site never sees it.

Config (the owner's half, ``imprint.backends.cloudinit.owner``, reads the document from a file)::

    document: "#cloud-config\\n..." (YAML text, as user-data) or an object (already parsed)
    always:   false: a document applied before (same SHA-256) is not run again; true: run it

Mechanism (Debian 12's cloud-init 22.4):

1. **Parse** with cloud-init's YAML loader (``cloudinit.safeyaml.load``); text must begin with
   ``#cloud-config`` as user-data does.
2. **Validate** with ``cloudinit.config.schema.validate_cloudconfig_schema(doc, get_schema(),
   strict=True)``. An invalid document is refused with cloud-init's own message ("Cloud config
   schema errors: users.0: ..."), nothing is run. Deprecations alone become warnings. cloud-init
   *skips* validation silently when jsonschema is missing: the backend checks that it is there.
3. **The policy** (:mod:`imprint.backends.cloudpolicy`): an allowlist of top-level keys and of
   what each may hold (no code, no reboot, nothing of imprint's own or of another backend's, no
   third-party trust, no secret on the console); the first field it refuses fails the backend.
   The modules are those the allowed keys are for, run in the order the root's
   ``/etc/cloud/cloud.cfg`` (and ``cloud.cfg.d``) lists them — init, config, final stage — so
   ``write_files`` runs before ``users_groups`` and ``defer: true`` files after. Just before the
   run, the document's paths are resolved on the VM (links, a user's directory).
4. **Run** them in a child process of the system's ``/usr/bin/python3`` (the agent's own process
   stays clean: modules log, chdir, change umask), through ``cloudinit.config.modules.Modules``
   — ``run_single(name, freq="always")``, the same path as ``cloud-init single``. Its
   configuration is the document merged over the system configuration (``cloud.cfg`` and
   ``cloud.cfg.d``, for ``system_info``, the distro class, the default user), *not* over the
   user-data the instance booted with; the datasource is cloud-init's ``DataSourceNone``, so
   nothing is fetched from a metadata service. Under ``--root`` other than ``/`` the child
   runs ``chroot ROOT /usr/bin/python3``: cloud-init's modules know no root prefix, so they act
   on "/" of whatever system they run in, and the root must hold python3 and cloud-init (as an
   image mounted for offline customisation does).
5. **Record** the document's SHA-256 in ``/var/lib/imprint/cloud-config/applied`` when every
   module succeeded: the same document again is not run (``changed: false``), as cloud-init's
   own per-instance semaphores would do; ``always = true`` runs it anyway.

**An interrupted run** (kill -9, power cut, a module that failed): before cloud-init runs, the
digest is written ahead to ``/var/lib/imprint/cloud-config/started``; it is removed once the
document is recorded. A run of exactly this document that finds it there resumes: what the
earlier run verifiably finished is taken out of the document before the path checks and before
cloud-init runs again, so the checks apply, unchanged, to what is still to be written. Without
that, a document that creates alice and writes into her new home could never be rerun: her home
is hers on the rerun, and root writing there through cloud-init (which follows links) is refused.
Finished means, checked through :mod:`imprint.backends.rootfs` (no link followed, nothing but a
regular file opened): a ``write_files`` entry's target is a regular file with one link, the
owner, group (when named) and mode the entry asks for, holding the content as cloud-init decodes
it (for ``append``: ending with it); for a user who exists, all of ``ssh_authorized_keys`` are in
her ``~/.ssh/authorized_keys`` (hers, one link) as cloud-init renders them, and the ``sudo``
block is in cloud-init's sudoers file (cloud-init would append it again). The other modules are
idempotent when rerun (see docs/backends.md for what was checked with cloud-init 22.4).

Results (``data``): ``sha256``, ``modules`` (in order), ``ran``, ``failed`` [{module, error}],
``skipped`` (already applied), ``resumed`` (an interrupted run of it was resumed),
``already_done`` (the fields that run had finished, not given to cloud-init again).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import posixpath
import re
import stat
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from imprint.backends import BackendContext, BackendError, BackendResult, cloudpolicy
from imprint.backends.cloudpolicy import Part
from imprint.backends.rootfs import _READ_FLAGS, FileRefused, GuestRoot, Parent, read_bounded
from imprint.fsatomic import TEMP_MARK, pid_alive

# Its files: Distro.files.cloud_config_applied, cloud_config_started (written ahead: the digest of
# the run under way) and cloud_config_work (the document for the child, 0600 in 0700: it may hold
# password hashes).
SCRATCH_RE = re.compile(rf"^\.?doc-([0-9]+)\.yaml({re.escape(TEMP_MARK)}[0-9]+)?\Z")  # pid N's document or its temp
MAX_DOCUMENT = 1 << 20
T = TypeVar("T")
# Debian 12's cloud.cfg order, used when the system has no cloud.cfg naming the modules.
DEFAULT_ORDER = (
    "migrator seed_random bootcmd write_files growpart resizefs disk_setup mounts set_hostname update_hostname "
    "update_etc_hosts ca_certs rsyslog users_groups ssh snap ssh_import_id keyboard locale set_passwords grub_dpkg "
    "apt_pipelining apt_configure ntp timezone disable_ec2_metadata runcmd byobu package_update_upgrade_install fan "
    "landscape lxd write_files_deferred puppet chef mcollective salt_minion reset_rmc refresh_rmc_and_interface "
    "rightscale_userdata scripts_vendor scripts_per_once scripts_per_boot scripts_per_instance scripts_user "
    "ssh_authkey_fingerprints keys_to_console install_hotplug phone_home final_message power_state_change"
).split()

# Runs in the child: `python3 -c RUNNER DOCUMENT_FILE MODULE...`; prints one JSON line last.
RUNNER = r'''
import copy, json, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from cloudinit import stages, util
from cloudinit.config.modules import Modules
from cloudinit.settings import PER_ALWAYS
from cloudinit.sources.DataSourceNone import DataSourceNone

from cloudinit import safeyaml
with open(sys.argv[1]) as f:
    document = safeyaml.load(f.read())  # the owner's YAML as sent (JSON is YAML too)
init = stages.Init(ds_deps=[])
init.datasource = DataSourceNone(init.cfg, init.distro, init.paths)
merged = util.mergemanydict([document, init.cfg])  # the first wins: the document over cloud.cfg

class DocumentModules(Modules):
    """cloud-init's runner with the owner's document over the system configuration only."""
    @property
    def cfg(self):
        return copy.deepcopy(merged)

modules = DocumentModules(init)
ran, failed = [], []
for name in sys.argv[2:]:
    which, failures = modules.run_single(name, freq=PER_ALWAYS)
    ran += which
    failed += [{"module": n, "error": f"{type(e).__name__}: {e}"} for n, e in failures]
print(json.dumps({"ran": ran, "failed": failed}))
'''

# Runs in a child of the agent's python: the module order of the root's cloud.cfg (and cloud.cfg.d).
ORDER = r'''
import json, os, sys
from cloudinit import util
cfg = util.read_conf_with_confd(sys.argv[1]) if os.path.exists(sys.argv[1]) else {}
order = []
for section in ("cloud_init_modules", "cloud_config_modules", "cloud_final_modules"):
    for item in cfg.get(section) or []:
        name = item if isinstance(item, str) else (item[0] if isinstance(item, list) else item.get("name", ""))
        name = name.strip().replace("-", "_")
        if name and name not in order:
            order.append(name)
print(json.dumps({"order": order}))
'''


def apply(ctx: BackendContext, config: dict[str, Any]) -> BackendResult:
    """``config`` fits imprint.backends.cloudinit.schema (the framework checked it)."""
    raw = config.get("document")
    document = _parse(raw)
    always = config.get("always") is True
    _validate(ctx, document)
    # The child gets the text as sent (YAML tags such as !!binary survive); an object as JSON.
    text = raw if isinstance(raw, str) else json.dumps(document, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()

    wanted = cloudpolicy.check(document)  # the allowlist: a BackendError naming the first field it refuses
    modules = _in_order(ctx, wanted)
    python = _python(ctx)
    files = ctx.paths.files
    state = ctx.path(files.cloud_config_applied)
    done = (ctx.read_file(state) or b"").decode(errors="replace").split()
    resumed = (ctx.read_file(ctx.path(files.cloud_config_started)) or b"").decode(errors="replace").strip() == digest
    if digest in done and not always:
        if resumed:  # killed between the record and the removal of its write-ahead: only that is left to do
            _files(ctx.files.remove, files.cloud_config_started, label="backend.cloudinit.started")
        return ctx.result(f"cloud-config {digest[:12]} was applied before; not run again", sha256=digest,
                          modules=modules, ran=[], failed=[], skipped=True)

    finished = _finished(ctx.files, document) if resumed else []
    # Where the paths lead now, just before cloud-init writes, for what is still to be written.
    cloudpolicy.check_paths(ctx.files, document, done=frozenset(finished), resumed=resumed)
    if finished:  # the rest of the document, as YAML cloud-init's loader reads back (bytes as !!binary)
        text = _cloudinit("cloudinit.safeyaml").dumps(_without(document, finished))
    ctx.ensure_dir(state.parent, mode=0o700, uid=0, gid=0, fix_existing=False, parents=True)
    _files(ctx.files.write, files.cloud_config_started, f"{digest}\n".encode(), mode=0o600, uid=0, gid=0,
           label="backend.cloudinit.started")
    report = _run(ctx, python, text, modules)
    ctx.note_change(f"ran cloud-init module(s) {', '.join(report['ran'])}")
    failed = report["failed"]
    if failed:  # the write-ahead stays: the next apply of this document resumes what this run finished
        raise BackendError("cloud-init module(s) failed: " + "; ".join(f"{f['module']}: {f['error']}" for f in failed))
    ctx.write_file(state, ("\n".join([*[d for d in done if d != digest][-99:], digest]) + "\n").encode(),
                   mode=0o600, uid=0, gid=0)
    _files(ctx.files.remove, files.cloud_config_started, label="backend.cloudinit.started")
    already = [cloudpolicy.where(*part) for part in finished]
    how = (f", resuming an interrupted run ({len(already)} part(s) it finished not redone)" if resumed else "")
    return ctx.result(f"cloud-config {digest[:12]} applied by cloud-init{how}: {', '.join(report['ran'])}",
                      sha256=digest, modules=modules, ran=report["ran"], failed=[], skipped=False, resumed=resumed,
                      already_done=already)


def _files(operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A rootfs operation on this backend's own bookkeeping, its refusal the backend's failure."""
    try:
        return operation(*args, **kwargs)
    except FileRefused as exc:
        raise BackendError(str(exc)) from None


def _parse(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        document = raw
    elif isinstance(raw, str):
        if len(raw) > MAX_DOCUMENT:
            raise BackendError(f"cloudinit.document is {len(raw)} characters; at most {MAX_DOCUMENT}")
        if not raw.startswith("#cloud-config"):
            raise BackendError("cloudinit.document must begin with '#cloud-config' (the only user-data type "
                               "this backend applies)")
        safeyaml = _cloudinit("cloudinit.safeyaml")
        try:
            document = safeyaml.load(raw)
        except Exception as exc:  # yaml's errors (ScannerError, ParserError...) carry the position
            raise BackendError(f"cloudinit.document is not YAML: {exc}") from None
    else:
        raise BackendError("cloudinit.document is required: cloud-config text or an object")
    if not isinstance(document, dict) or not document:
        raise BackendError("cloudinit.document must be a non-empty mapping of cloud-config keys")
    return document


def _cloudinit(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendError("cloud-init is not installed in the VM (Debian: cloud-init)") from None


def _validate(ctx: BackendContext, document: dict[str, Any]) -> None:
    schema = _cloudinit("cloudinit.config.schema")
    import importlib.util

    if importlib.util.find_spec("jsonschema") is None:  # without it cloud-init validates nothing, silently
        raise BackendError("python3-jsonschema is missing: cloud-init would skip validation") from None
    import warnings

    try:
        with warnings.catch_warnings():  # cloud-init 22.4 uses an API jsonschema 4.10 deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            schema.validate_cloudconfig_schema(document, schema.get_schema(), strict=True, log_details=False)
    except schema.SchemaValidationError as exc:
        if exc.has_errors():
            raise BackendError(f"cloud-init refuses the document: {exc}") from None
        for problem in exc.schema_deprecations or []:
            ctx.warn(f"cloud-init: deprecated: {problem.format()}")


def _python(ctx: BackendContext) -> list[str]:
    python = ctx.paths.programs.python3
    if ctx.paths.is_real_root:
        return [python]
    root = ctx.paths.root.resolve()
    if not (root / python.lstrip("/")).exists():
        raise BackendError(f"cloud-init's modules act on the system they run in: under --root {root} they run "
                           f"with chroot, and {root}{python} does not exist")
    return [ctx.paths.programs.chroot, str(root), python]


def _in_order(ctx: BackendContext, modules: list[str]) -> list[str]:
    """``modules`` in the order the root's cloud.cfg runs them (init, config, final stage)."""
    cloud_cfg = ctx.path("/etc/cloud/cloud.cfg")
    proc = ctx.run([sys.executable, "-c", ORDER, str(cloud_cfg)], timeout=120)
    try:
        listed = json.loads(proc.stdout.strip().splitlines()[-1])["order"]
    except (IndexError, KeyError, ValueError):
        raise BackendError(f"cannot read the module order of {ctx.paths.guest(cloud_cfg)}") from None
    order = [*listed, *[m for m in DEFAULT_ORDER if m not in listed]]
    return sorted(modules, key=lambda m: (order.index(m) if m in order else len(order), m))


def _run(ctx: BackendContext, python: list[str], text: str, modules: list[str]) -> dict[str, Any]:
    # The document goes to the child in a 0600 file in a 0700 directory under the root (it may
    # hold password hashes), visible at the same guest path inside a chroot.
    # Scratch, not a change to the VM: through the root's walk (no link followed, never outside
    # --root) but not counted as a change.
    work = ctx.paths.files.cloud_config_work
    doc = f"{work}/doc-{os.getpid()}.yaml"
    try:
        ctx.files.ensure_dir(work, mode=0o700, uid=0, gid=0, made=[])
        _sweep_scratch(ctx.files, work)
        ctx.files.write(doc, text.encode(), mode=0o600, uid=0, gid=0, label="backend.cloudinit.document")
    except FileRefused as exc:
        raise BackendError(f"cannot hand the document to cloud-init: {exc}") from None
    try:
        proc = ctx.run([*python, "-c", RUNNER, doc, *modules], check=False, timeout=1800)
    finally:
        with contextlib.suppress(FileRefused):
            ctx.files.remove(doc, label="backend.cloudinit.document")
            ctx.files.remove_dir(work)
    try:
        report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BackendError(f"cloud-init's module runner failed (exit {proc.returncode}): "
                           f"{' '.join(proc.stderr.strip().splitlines()[-3:])[-400:]}") from None
    for line in proc.stderr.splitlines():
        if line.startswith("WARNING "):
            ctx.warn(f"cloud-init: {line.removeprefix('WARNING ')[:300]}")
    return report


def _sweep_scratch(files: GuestRoot, work: str) -> None:
    """Documents (and their temps) that applies killed before their cleanup left in the scratch
    directory: they may hold password hashes. A live apply's is left alone."""
    with files.parent(f"{work}/-") as found:
        if found is None:
            return
        parent, _ = found
        stale: list[str] = []
        with contextlib.suppress(OSError), os.scandir(parent.fd) as entries:
            stale = [e.name for e in entries if not e.is_dir(follow_symlinks=False)
                     and (m := SCRATCH_RE.match(e.name)) is not None and not pid_alive(int(m.group(1)))]
        for name in stale:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent.fd)


# -- resuming an interrupted run: what it finished, checked on the VM without following a link
def _finished(files: GuestRoot, document: dict[str, Any]) -> list[Part]:
    """The parts of the document that a run of it verifiably finished (see the module docstring)."""
    passwd = cloudpolicy.account_db(files, "/etc/passwd")
    groups = cloudpolicy.account_db(files, "/etc/group")
    parts: list[Part] = [("write_files", i) for i, item in enumerate(document.get("write_files") or [])
                         if _file_written(files, item, passwd, groups)]
    for part, item in cloudpolicy.user_items(document):
        name = item.get("name")
        entry = passwd.get(name) if isinstance(name, str) else None
        if entry is None or len(entry) != 7:
            continue  # not created yet: cloud-init makes her as the document says
        if item.get("ssh_authorized_keys") and _keys_present(files, entry[5], item["ssh_authorized_keys"]):
            parts.append((*part, "ssh_authorized_keys"))
        if item.get("sudo") and _sudo_present(files, entry[0], item["sudo"]):
            parts.append((*part, "sudo"))
    return parts


def _without(document: dict[str, Any], parts: list[Part]) -> dict[str, Any]:
    rest = copy.deepcopy(document)
    drop = set(parts)
    if "write_files" in rest:
        rest["write_files"] = [f for i, f in enumerate(rest["write_files"]) if ("write_files", i) not in drop]
        if not rest["write_files"]:
            del rest["write_files"]
    for part, item in cloudpolicy.user_items(rest):
        for key in ("ssh_authorized_keys", "sudo"):
            if (*part, key) in drop:
                del item[key]
    return rest


def _account_id(db: dict[str, list[str]], name: str) -> int | None:
    entry = db.get(name)
    try:
        return int(entry[2]) if entry is not None and len(entry) >= 3 else None
    except ValueError:
        return None


def _file_written(files: GuestRoot, item: dict[str, Any], passwd: dict[str, list[str]],
                  groups: dict[str, list[str]]) -> bool:
    """The ``write_files`` entry is on the VM as cloud-init 22.4 writes it (its own decoding)."""
    write_files = _cloudinit("cloudinit.config.cc_write_files")
    util = _cloudinit("cloudinit.util")
    try:
        data: bytes = util.encode_text(write_files.extract_contents(
            item.get("content", ""), write_files.canonicalize_extraction(item.get("encoding"))))
    except Exception:  # cloud-init could not decode it either: that run cannot have written it
        return False
    user, group = util.extract_usergroup(item.get("owner", _cloudinit("cloudinit.distros").Distro.default_owner))
    uid = _account_id(passwd, user) if user else None
    gid = _account_id(groups, group) if group else None
    if uid is None or (group and gid is None):
        return False  # an owner that is not a local account: nothing to check it against
    mode = write_files.decode_perms(item.get("permissions"), write_files.DEFAULT_PERMS)
    try:
        with files.parent(item["path"]) as found:
            return found is not None and _holds(*found, data, mode=mode, uid=uid, gid=gid,
                                                append=util.get_cfg_option_bool(item, "append"))
    except FileRefused:  # a user's link on the way: not as written (and refused by the path check)
        return False


def _holds(parent: Parent, name: str, data: bytes, *, mode: int, uid: int, gid: int | None, append: bool) -> bool:
    """``name`` in ``parent`` is a regular file with one link, this owner and mode, holding ``data``
    (ending with it, for an append); a link, a FIFO or a device is never opened."""
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=parent.fd, follow_symlinks=False).st_mode):
            return False
        fd = os.open(name, _READ_FLAGS, dir_fd=parent.fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != uid or gid not in (None, st.st_gid)
                or stat.S_IMODE(st.st_mode) != mode or st.st_size < len(data)
                or (st.st_size != len(data) and not append)):
            return False
        os.lseek(fd, st.st_size - len(data), os.SEEK_SET)
        return read_bounded(fd, len(data), parent.path_of(name)) == data
    except (OSError, FileRefused):  # it grew meanwhile: not as written
        return False
    finally:
        os.close(fd)


def _keys_present(files: GuestRoot, home: str, keys: Any) -> bool:
    """Every key is in the user's authorized_keys as cloud-init renders it (and no other line has
    its key with other options, which cloud-init would rewrite); read as hers, one link."""
    ssh_util = _cloudinit("cloudinit.ssh_util")
    parser = ssh_util.AuthKeyLineParser()
    wanted = {entry.base64: str(entry) for entry in (parser.parse(str(k)) for k in
                                                     ([keys] if isinstance(keys, str) else keys))}
    try:
        data = files.read(posixpath.join(home, ".ssh/authorized_keys"))
    except FileRefused:
        return False
    if data is None or None in wanted:
        return False
    present = set()
    for line in data.decode(errors="replace").splitlines():
        entry = parser.parse(line)
        if entry.valid() and entry.base64 in wanted:
            if str(entry) != wanted[entry.base64]:
                return False
            present.add(entry.base64)
    return present == set(wanted)


def _sudo_present(files: GuestRoot, name: str, rules: Any) -> bool:
    """The block cloud-init's ``write_sudo_rules`` appends for the user is in its sudoers file."""
    rules = [rules] if isinstance(rules, str) else rules
    if not isinstance(rules, list):
        return False
    block = [f"# User rules for {name}", *(f"{name} {rule}" for rule in rules)]
    try:
        data = files.read(_cloudinit("cloudinit.distros").Distro.ci_sudoers_fn)
    except FileRefused:
        return False
    lines = (data or b"").decode(errors="replace").splitlines()
    return any(lines[i:i + len(block)] == block for i in range(len(lines)))
