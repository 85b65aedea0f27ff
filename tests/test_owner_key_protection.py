"""The owner key encrypted at rest (issue 13 item 5; docs/protocol.md §8.3): the file format, the
passphrase sources, and real CLI and `imprint serve` processes on an encrypted home, with real
agents. No secret (passphrase, key) reaches a file of the home, a command line or an environment."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imprint import crypto
from imprint.owner import keyfile
from imprint.owner.errors import UsageError
from imprint.owner.home import OwnerHome

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import read_log
from tests.helpers.serve import Serve
from tests.sshkit import free_port

PASSPHRASE = b"correct horse battery staple 13"
FAST_N = keyfile.MIN_SCRYPT_N  # the unit tests seal with the cheapest n a file may name


def _passphrase_file(directory: Path, secret: bytes = PASSPHRASE, name: str = "passphrase") -> Path:
    path = directory / name
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def _env(passphrase_file: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (keyfile.ENV_FILE, "CREDENTIALS_DIRECTORY")}
    if passphrase_file is not None:
        env[keyfile.ENV_FILE] = str(passphrase_file)
    return env


def _cli(home: Path, *args: str, env: dict[str, str], check: int) -> subprocess.CompletedProcess[str]:
    """The CLI with stdin not a terminal (so it never prompts, whatever runs the tests)."""
    result = subprocess.run([sys.executable, "-m", "imprint.owner", "--home", str(home), *args],
                            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def _json(owner: Owner, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(owner.run(*args, "--json", env=env).stdout)
    return data


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    return _passphrase_file(tmp_path)


@pytest.fixture
def encrypted(tmp_path: Path, secret_file: Path) -> Owner:
    owner = Owner(tmp_path / "encrypted-home")
    made = owner.run("init", "--passphrase", "--json", env=_env(secret_file)).stdout
    assert '"encrypted": true' in made
    return owner


def _secrets(home: Path) -> list[bytes]:
    """The passphrase, the key's raw 32 bytes, its DER and its unencrypted PEM (each base64 line)."""
    key = OwnerHome(home).unlock(PASSPHRASE)
    der = key.to_der()
    pem_lines = [line for line in key.to_pem().splitlines() if line and not line.startswith(b"-----")]
    return [PASSPHRASE, der[-32:], der, base64.b64encode(der), key.to_pem(), *pem_lines]


def _assert_absent(data: bytes, secrets: list[bytes], where: str) -> None:
    for secret in secrets:
        assert secret not in data, f"a secret ({len(secret)} bytes) is in {where}"


# ---- the file format


def test_sealed_key_round_trips_and_each_header_field_is_bound() -> None:
    key = crypto.PrivateKey.generate()
    sealed = keyfile.seal(key, PASSPHRASE, n=FAST_N)
    assert keyfile.unseal(sealed, PASSPHRASE).public == key.public
    text = sealed.decode()
    assert text.startswith(keyfile.BEGIN.decode()) and text.endswith(keyfile.END.decode())
    fields = dict(line.split(": ", 1) for line in text.splitlines()[1:7])
    assert fields == {"Version": "1", "KDF": "scrypt", "KDF-Params": f"n={FAST_N},r=8,p=1",
                      "Salt": fields["Salt"], "Cipher": "AES-256-GCM", "Nonce": fields["Nonce"]}

    def flipped(value: str) -> str:  # the same length and alphabet, another value
        return ("B" if value[0] == "A" else "A") + value[1:]

    tampered = {
        "version": text.replace("Version: 1", "Version: 2"),
        "kdf": text.replace("KDF: scrypt", "KDF: pbkdf2"),
        "n": text.replace(f"n={FAST_N}", f"n={FAST_N * 2}"),
        "r": text.replace(",r=8,", ",r=9,"),
        "p": text.replace(",p=1", ",p=2"),
        "huge n": text.replace(f"n={FAST_N}", "n=67108864"),
        "salt": text.replace(fields["Salt"], flipped(fields["Salt"])),
        "cipher": text.replace("AES-256-GCM", "CHACHA20-POLY1305"),
        "nonce": text.replace(fields["Nonce"], flipped(fields["Nonce"])),
        "extra header line": text.replace("Cipher:", "Comment: x\nCipher:"),
        "ciphertext": text.replace(text.splitlines()[8], flipped(text.splitlines()[8])),
        "truncated": text[:-60],
        "trailing data": text + "x\n",
    }
    for what, changed in tampered.items():
        assert changed != text, what
        with pytest.raises(UsageError) as refused:
            keyfile.unseal(changed.encode(), PASSPHRASE)
        assert "damaged" in str(refused.value) or "version 2" in str(refused.value), what
    with pytest.raises(UsageError, match="wrong passphrase, or owner.key is damaged"):
        keyfile.unseal(sealed, PASSPHRASE + b"x")
    assert PASSPHRASE not in sealed and key.to_der()[-32:] not in base64.b64decode(text.splitlines()[8])


def test_a_passphrase_file_must_be_private_regular_and_small(tmp_path: Path) -> None:
    good = _passphrase_file(tmp_path)
    assert keyfile.read_passphrase_file(good, "F") == PASSPHRASE
    crlf = tmp_path / "crlf"
    crlf.write_bytes(b"x y\r\n")
    crlf.chmod(0o600)
    assert keyfile.read_passphrase_file(crlf, "F") == b"x y"
    good.chmod(0o644)
    with pytest.raises(UsageError, match="readable by other users"):
        keyfile.read_passphrase_file(good, "F")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="larger"):
        keyfile.read_passphrase_file(big, "F")
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    empty.chmod(0o600)
    with pytest.raises(UsageError, match="empty"):
        keyfile.read_passphrase_file(empty, "F")
    with pytest.raises(UsageError, match="not a regular file"):
        keyfile.read_passphrase_file(tmp_path, "F")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        keyfile.read_passphrase_file(fifo, "F")


def test_credentials_directory_is_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "creds").mkdir()
    _passphrase_file(tmp_path / "creds", name=keyfile.CREDENTIAL)
    monkeypatch.delenv(keyfile.ENV_FILE, raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert keyfile.passphrase(tmp_path / "owner.key", new=False) == PASSPHRASE


# ---- real processes on an encrypted home


def test_bind_and_status_with_the_passphrase_file_only(agents: AgentFactory, encrypted: Owner,
                                                       secret_file: Path) -> None:
    env = _env(secret_file)
    token = encrypted.run("token", "new", "web1", "--mode", "nosecret", env=env).stdout.strip().splitlines()[-1]
    agent = agents.start(agents.make_root(token))
    bound = _json(encrypted, "bind", "web1", "--address", agent.address, "--vm-token", agent.vm_token(),
                           env=env)
    assert agent.state()["owner_fingerprint"] == bound["owner_fingerprint"]
    status = _json(encrypted, "status", "web1", env=env)
    assert status["state"] == "bound" and status["owner_fingerprint"] == bound["owner_fingerprint"]

    refused = _cli(encrypted.home, "status", "web1", env=_env(None), check=2)
    assert "is encrypted and no passphrase was given" in refused.stderr
    assert keyfile.ENV_FILE in refused.stderr and "terminal" in refused.stderr
    wrong = _cli(encrypted.home, "status", "web1", env=_env(_passphrase_file(secret_file.parent, b"nope", "w")),
                 check=2)
    assert "wrong passphrase, or owner.key is damaged" in wrong.stderr
    loose = _passphrase_file(secret_file.parent, PASSPHRASE, "loose")
    loose.chmod(0o644)
    assert "readable by other users" in _cli(encrypted.home, "status", "web1", env=_env(loose), check=2).stderr

    secrets = _secrets(encrypted.home)
    for path in sorted(encrypted.home.rglob("*")):
        if path.is_file():
            _assert_absent(path.read_bytes(), secrets, str(path))
    for output in (bound, status):
        _assert_absent(repr(output).encode(), secrets, "the CLI's output")


def test_a_tampered_key_file_is_refused_without_a_traceback(encrypted: Owner, secret_file: Path) -> None:
    original = (encrypted.home / "owner.key").read_bytes()
    lines = original.decode().splitlines(keepends=True)
    for index, what in ((3, "KDF-Params"), (4, "Salt"), (6, "Nonce"), (8, "ciphertext")):
        changed = list(lines)
        value = changed[index]
        at = value.index(": ") + 3 if ": " in value else 3  # early in the value: data bits, not padding
        changed[index] = value[:at] + ("B" if value[at] != "B" else "C") + value[at + 1:]
        if what == "KDF-Params":
            changed[index] = value.replace("p=1", "p=2")
        (encrypted.home / "owner.key").write_text("".join(changed))
        result = _cli(encrypted.home, "token", "new", "x", "--mode", "nosecret", "--json",
                      env=_env(secret_file), check=2)
        assert "wrong passphrase, or owner.key is damaged" in result.stderr, (what, result.stderr)
        assert '"exit_code": 2' in result.stdout
    (encrypted.home / "owner.key").write_bytes(original)
    _cli(encrypted.home, "token", "new", "x", "--mode", "nosecret", env=_env(secret_file), check=0)


def _proc_bytes(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


@pytest.fixture
def serve_encrypted(encrypted: Owner, secret_file: Path, tmp_path: Path) -> Iterator[Serve]:
    listener = Serve(encrypted, free_port(), tmp_path / "serve.log", env=_env(secret_file)).start()
    yield listener
    listener.kill()


def test_serve_on_an_encrypted_home_shows_no_secret_in_proc(agents: AgentFactory, encrypted: Owner,
                                                            secret_file: Path, serve_encrypted: Serve) -> None:
    env = _env(secret_file)
    assert serve_encrypted.proc is not None
    pid = serve_encrypted.proc.pid
    token = encrypted.run("token", "new", "web1", "--mode", "shared", env=env).stdout.strip().splitlines()[-1]
    root = agents.make_root(token)
    cmdline = root / "proc" / "cmdline"
    cmdline.write_text(cmdline.read_text().strip() + f" imprint.owner={serve_encrypted.address}\n")
    agent = agents.start(root, "--listen", "none", env=dict(
        os.environ, IMPRINT_AGENT_RECONNECT_SECONDS="0.2", IMPRINT_AGENT_RECONNECT_CAP_SECONDS="1"))
    agent.await_status("connected to the owner")
    status = _json(encrypted, "status", "web1", env=env)  # through the listener's connection
    assert status["state"] == "bound"

    secrets = _secrets(encrypted.home)
    environ = _proc_bytes(pid, "environ")
    assert f"{keyfile.ENV_FILE}={secret_file}".encode() in environ.split(b"\0")  # the file's name only
    _assert_absent(environ, secrets, "the listener's environment")
    _assert_absent(_proc_bytes(pid, "cmdline"), secrets, "the listener's command line")
    # The decrypted key went to ssl through a memfd that was closed at once.
    links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.exists()]
    assert not [link for link in links if "imprint-owner-key" in link], links
    _assert_absent(read_log(serve_encrypted.log).encode(), secrets, "the listener's log")
    for path in sorted(encrypted.home.rglob("*")):
        if path.is_file():
            _assert_absent(path.read_bytes(), secrets, str(path))


def test_init_encrypts_an_unencrypted_home_in_place(owner: Owner, secret_file: Path) -> None:
    before = _json(owner, "init")["owner_fingerprint"]
    plain = (owner.home / "owner.key").read_bytes()
    result = owner.run("init", "--passphrase", env=_env(secret_file)).stdout
    assert "encrypted in place" in result
    assert keyfile.is_sealed((owner.home / "owner.key").read_bytes())
    assert plain not in (owner.home / "owner.key").read_bytes()
    after = _cli(owner.home, "init", "--json", env=_env(secret_file), check=0).stdout
    assert before in after and '"encrypted": true' in after
    _cli(owner.home, "init", env=_env(None), check=2)


def test_export_import_round_trip(tmp_path: Path, encrypted: Owner, owner: Owner, secret_file: Path) -> None:
    env = _env(secret_file)
    fingerprint = _json(encrypted, "init", env=env)["owner_fingerprint"]
    exported = _json(encrypted, "key", "export", "--out", str(tmp_path / "backup.key"))  # no passphrase needed
    assert exported["owner_fingerprint"] == fingerprint and exported["reused_home_encryption"] is True
    assert (tmp_path / "backup.key").stat().st_mode & 0o777 == 0o600
    _cli(encrypted.home, "key", "export", "--out", str(tmp_path / "backup.key"), env=env, check=2)  # exists

    restored = Owner(tmp_path / "restored")
    _cli(restored.home, "key", "import", str(tmp_path / "backup.key"), env=_env(None), check=2)
    imported = _json(restored, "key", "import", str(tmp_path / "backup.key"), env=env)
    assert imported["owner_fingerprint"] == fingerprint
    assert _json(restored, "init", env=env)["owner_fingerprint"] == fingerprint
    assert (restored.home / "owner.crt").read_bytes() == (encrypted.home / "owner.crt").read_bytes()
    refused = _cli(restored.home, "key", "import", str(tmp_path / "backup.key"), env=env, check=2)
    assert "refusing to overwrite" in refused.stderr

    # An unencrypted home's export is sealed with the export passphrase given now.
    plain_fingerprint = _json(owner, "init")["owner_fingerprint"]
    other = _passphrase_file(tmp_path, b"export passphrase", "export")
    _cli(owner.home, "key", "export", "--out", str(tmp_path / "plain.key"), env=_env(None), check=2)
    owner.run("key", "export", "--out", str(tmp_path / "plain.key"), env=_env(other))
    data = (tmp_path / "plain.key").read_bytes()
    assert keyfile.is_sealed(data) and (owner.home / "owner.key").read_bytes() not in data
    second = Owner(tmp_path / "second")
    assert _json(second, "key", "import", str(tmp_path / "plain.key"), env=_env(other))["owner_fingerprint"] \
        == plain_fingerprint
    assert re.search(rb"KDF-Params: n=131072,r=8,p=1\n", data)
