"""The backend framework: discovery by entry point, failure isolation, atomic idempotent writes,
crash safety, a third-party backend in a real agent, and the /v1/apply route."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from imprint import backends
from imprint.backends import BackendContext, BackendError, apply_document, load, run_backend
from imprint.fsatomic import write_atomic
from imprint.guest.distro import Distro

from tests.backend_samples import crash_between_write_and_rename, registered_with_samples
from tests.helpers import AgentFactory, Owner
from tests.sshkit import needs_root


@pytest.fixture
def samples(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = backends.registered
    monkeypatch.setattr(backends, "registered", lambda: registered_with_samples(installed()))


def _ctx(root: Path) -> BackendContext:
    return BackendContext(name="test", paths=Distro(root), log=backends.log)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode), st.st_uid


# -- discovery
def test_ssh_is_registered_as_an_entry_point() -> None:
    found = {ep.name: ep.value for ep in entry_points(group=backends.GROUP)}
    assert found.get("ssh") == "imprint.backends.ssh:BACKEND", "reinstall: pip install --no-build-isolation -e ."
    from imprint.backends import ssh

    assert load("ssh") is ssh.BACKEND


def test_a_name_registered_twice_is_refused() -> None:
    with pytest.raises(BackendError, match="registered more than once"):
        load("ssh", {"ssh": {"imprint.backends.ssh:BACKEND", "evil_vendor:BACKEND"}})


def test_agent_start_up_imports_no_backend_code() -> None:
    """The agent's path to READY stays as it was: the framework loads on the first apply."""
    code = ("import sys, imprint.guest.cli, imprint.guest.server, imprint.guest.control; "
            "print(sorted(m for m in sys.modules if m.startswith('imprint.backends') or m == 'importlib.metadata'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- running: one failing backend does not stop the others
def test_each_failure_is_reported_and_the_others_still_run(tmp_path: Path, samples: None) -> None:
    document = {
        "refuses": {},
        "crashes": {},
        "returns-junk": {},
        "not-callable": {},
        "not-a-backend": {},
        "misnamed": {},
        "unimportable": {},
        "no-such-backend": {},
        "Bad Name": {},
        "note": {"text": "hello"},
    }
    results = apply_document(Distro(tmp_path), document)["results"]
    assert list(results) == list(document)
    reasons = {name: r["summary"] for name, r in results.items() if not r["ok"]}
    assert reasons["refuses"] == "refuses.reason: this backend always refuses"
    assert reasons["crashes"] == "internal error in backend 'crashes': RuntimeError: a bug in the backend"
    assert "returned dict, not a BackendResult" in reasons["returns-junk"]
    assert "is not callable" in reasons["not-callable"]
    assert "is int, not an imprint Backend" in reasons["not-a-backend"]
    assert "declares the name 'note'" in reasons["misnamed"]
    assert "cannot be loaded: ModuleNotFoundError" in reasons["unimportable"]
    assert reasons["no-such-backend"].startswith("no backend named 'no-such-backend' is installed in the VM; "
                                                 "installed:")
    assert "is not a backend name" in reasons["Bad Name"]
    assert results["note"]["ok"] is True and results["note"]["changed"] is True
    assert (tmp_path / "etc/note").read_text() == "hello"
    assert set(results["note"]) == {"ok", "changed", "summary", "data", "changes", "warnings", "seconds"}
    json.dumps(results)  # everything goes back to the owner as JSON


def test_config_errors_name_the_field(tmp_path: Path, samples: None) -> None:
    paths = Distro(tmp_path)
    assert run_backend(paths, "note", {"txt": "x"})["summary"] == "note: unknown key(s) txt; known: mode, text"
    assert run_backend(paths, "note", {"text": 3})["summary"] == "note.text must be str, not int"
    assert run_backend(paths, "note", {"text": "x", "mode": True})["summary"] == \
        "note.mode must be an integer, not a boolean"
    assert run_backend(paths, "note", [])["summary"] == "the config of backend 'note' must be an object, not list"
    assert not (tmp_path / "etc/note").exists()


def test_running_twice_changes_nothing(tmp_path: Path, samples: None) -> None:
    paths = Distro(tmp_path)
    first = run_backend(paths, "note", {"text": "one"})
    assert first["changed"] is True and first["changes"] == [f"created {tmp_path}/etc", f"wrote {tmp_path}/etc/note"]
    before = _identity(tmp_path / "etc/note")
    second = run_backend(paths, "note", {"text": "one"})
    assert second["ok"] and second["changed"] is False and second["changes"] == []
    assert _identity(tmp_path / "etc/note") == before  # not even rewritten
    # Only the mode differs: that is a change, and it is made.
    third = run_backend(paths, "note", {"text": "one", "mode": 0o600})
    assert third["changed"] is True
    assert stat.S_IMODE((tmp_path / "etc/note").stat().st_mode) == 0o600


# -- files: owner, mode, symlinks, crashes
@needs_root
def test_write_atomic_sets_owner_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"data", mode=0o640, uid=4242, gid=4343)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o640)
    assert path.read_bytes() == b"data"
    write_atomic(path, b"again")  # the defaults are what they always were: the writer's, 0600
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)


def test_write_atomic_refuses_a_symlinked_directory_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    write_atomic(tmp_path / "link" / "ok", b"x")  # default: follows, as before
    with pytest.raises(OSError):
        write_atomic(tmp_path / "link" / "refused", b"x", dir_nofollow=True)
    assert sorted(p.name for p in target.iterdir()) == ["ok"]


def test_context_refuses_symlinks(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    (tmp_path / "real").write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(BackendError, match="is a symlink"):
        ctx.write_file(tmp_path / "link", b"x", mode=0o644)
    with pytest.raises(BackendError, match="is a symlink"):
        ctx.read_file(tmp_path / "link")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    with pytest.raises(BackendError, match="is a symlink"):
        ctx.ensure_dir(tmp_path / "dirlink", mode=0o700)
    assert (tmp_path / "real").read_text() == "secret"


def test_a_failure_between_write_and_rename_leaves_the_old_file(tmp_path: Path, samples: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Distro(tmp_path)
    assert run_backend(paths, "note", {"text": "old"})["ok"]

    def failing_replace(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    result = run_backend(paths, "note", {"text": "new"})
    monkeypatch.undo()
    assert result["ok"] is False and "No space left on device" in result["summary"]
    assert (tmp_path / "etc/note").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["note"]  # the temp file is gone too


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path, samples: None) -> None:
    paths = Distro(tmp_path)
    assert run_backend(paths, "note", {"text": "old"})["ok"]
    crash_between_write_and_rename(tmp_path, "note", "note", {"text": "new"})
    assert (tmp_path / "etc/note").read_text() == "old"
    leftovers = [p.name for p in (tmp_path / "etc").iterdir() if p.name != "note"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".note.tmp.")  # a crash cannot clean up...
    result = run_backend(paths, "note", {"text": "new"})
    assert result["ok"] and result["changed"]
    assert (tmp_path / "etc/note").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "etc").iterdir()) == ["note"]  # ...the next write does


# -- a third-party backend, installed the way a vendor would ship it, in a real agent
HELLO = textwrap.dedent('''
    """A vendor's backend with a guest half only and no schema: writes /etc/hello/greeting."""
    from imprint.backends import BackendError
    from imprint.backends.plugin import Backend

    def apply(ctx, config):
        if set(config) != {"greeting"}:
            raise BackendError("hello: the one key is greeting")
        greeting = config.get("greeting")
        if not isinstance(greeting, str) or not greeting:
            raise BackendError("hello.greeting must be a non-empty string")
        ctx.ensure_dir(ctx.path("/etc/hello"), mode=0o755, parents=True)
        ctx.write_file(ctx.path("/etc/hello/greeting"), (greeting + "\\n").encode(), mode=0o644)
        return ctx.result(f"greeting set to {greeting!r}", greeting=greeting)

    BACKEND = Backend(name="hello", guest=lambda: apply, writes=("/etc/hello/greeting",))
''')


def third_party_package(where: Path) -> Path:
    """A distribution as pip would install it: the module and its dist-info with entry_points.txt."""
    site = where / "vendor-site"
    (site / "imprint_hello").mkdir(parents=True)
    (site / "imprint_hello" / "__init__.py").write_text(HELLO)
    info = site / "imprint_hello-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: imprint-hello\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[imprint.backends]\nhello = imprint_hello:BACKEND\n")
    (info / "RECORD").write_text("")
    return site


def test_a_third_party_backend_runs_in_the_agent(agents: AgentFactory, owner: Owner, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(third_party_package(tmp_path)))
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    profile = tmp_path / "profile.toml"
    profile.write_text('[hello]\ngreeting = "hi from the vendor"\n')
    bound = owner.json("bind", "web1", "--address", agent.address, "--profile", str(profile))
    hello = bound["apply"]["results"]["hello"]  # type: ignore[index]
    assert hello["ok"] is True and hello["changed"] is True, hello
    assert hello["data"] == {"greeting": "hi from the vendor"}
    assert (agent.root / "etc/hello/greeting").read_text() == "hi from the vendor\n"
    assert "no attested SSH host keys for web1" in owner.run("ssh", "web1", check=2).stderr

    again = owner.json("apply", "web1", "--profile", str(profile))
    assert again["ok"] is True and again["results"]["hello"]["changed"] is False  # type: ignore[index]

    # A bad config and an unknown backend fail alone; the one in between still runs; exit 5.
    profile.write_text('[hello]\ngreeting = ""\n[nosuch]\nx = 1\n')
    failed = owner.run("apply", "web1", "--profile", str(profile), check=5)
    assert "hello: FAILED — hello.greeting must be a non-empty string" in failed.stdout
    assert "nosuch: FAILED — no backend named 'nosuch' is installed in the VM; installed: " in failed.stdout
    installed = failed.stdout.split("installed: ")[1].splitlines()[0].split(", ")
    assert "hello" in installed and "ssh" in installed  # the vendor's and imprint's own are listed
    audit = owner.json("audit", "web1")["audit"]
    assert [e["outcome"] for e in audit if e["action"] == "apply"] == ["ok", "ok", "failed"]  # type: ignore[index]


def test_bad_profiles_are_refused_before_the_token_is_spent(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    profile = tmp_path / "profile.toml"
    for text, message in (("[ssh\n", "is not valid TOML"), ("ssh = 3\n", "'ssh' must be a table"),
                          ("", "names no backend"), ("[ssh]\nusers = 3\n", "profile [ssh]: users must be"),
                          ("[ssh]\nhost_certificate = true\n", "run `imprint ca init` first"),
                          ("[ssh]\nusres = []\n", "unknown key(s) usres")):
        profile.write_text(text)
        result = owner.run("bind", "web1", "--address", agent.address, "--profile", str(profile), check=2)
        assert message in result.stderr, (text, result.stderr)
    assert owner.run("bind", "web1", "--address", agent.address, "--profile", str(tmp_path / "none.toml"),
                     check=2).stderr.endswith("does not exist\n")
    assert agent.state().get("bound") is not True  # the token is still good
    owner.run("bind", "web1", "--address", agent.address)


def test_apply_route_refuses_malformed_documents(agents: AgentFactory, owner: Owner) -> None:
    from imprint.owner.client import PinnedClient
    from imprint.owner.errors import Unreachable
    from imprint.owner.home import OwnerHome

    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    home = OwnerHome(owner.home)
    pin = home.store().pin("web1")
    assert pin is not None
    client = PinnedClient(home, "web1", pin.vm_cert, agent.address)
    try:
        for body, message in (({}, "the body must be"), ({"backends": []}, "the body must be"),
                              ({"backends": {}}, "the body must be"),
                              ({"backends": {"ssh": {}}, "extra": 1}, "unknown key(s) in the body: extra")):
            with pytest.raises(Unreachable, match="answered 400 to POST /v1/apply: " + message.replace("(", r"\(")
                               .replace(")", r"\)")):
                client.post("/v1/apply", body)
        with pytest.raises(Unreachable, match="answered 405"):
            client.get("/v1/apply")
    finally:
        client.close()


def test_the_owners_files_are_read_bounded_and_a_fifo_does_not_block(tmp_path: Path) -> None:
    """A profile (or a file it names) that is a FIFO, a device or huge: refused at once, named."""
    from imprint.backends.cloudinit.owner import prepare
    from imprint.backends.x509.owner import load_ca
    from imprint.owner.apply import load_profile
    from imprint.owner.errors import UsageError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    subprocess.run(["truncate", "-s", "1G", str(big)], check=True)
    for path, message in ((fifo, f"profile: cannot read {fifo}: it is a FIFO, not a regular file"),
                          (Path("/dev/zero"),
                           "profile: cannot read /dev/zero: it is a character device, not a regular file"),
                          (big, f"profile: {big} is larger than 4194304 bytes")):
        with pytest.raises(UsageError) as refused:
            load_profile(path)
        assert str(refused.value) == message
    with pytest.raises(UsageError, match=f"^cannot read {fifo}: it is a FIFO, not a regular file$"):
        prepare(None, {"file": str(fifo)})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="cannot load the CA from /dev/zero and .*: cannot read /dev/zero: it is a "
                                         "character device"):
        load_ca(Path("/dev/zero"), fifo)
