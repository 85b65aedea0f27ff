"""The distro module is where the agent finds its helper programs (issue 10, item 4): a
distribution or a test that names another program gets that program run, not the default."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imprint.backends import run_backend
from imprint.guest.distro import Distro, Programs

from tests.sshkit import needs_root, seed_root


def _recording_wrapper(tmp_path: Path, program: str) -> tuple[Path, Path]:
    """An executable that appends its argv to a log, then runs the real ``program``."""
    real = shutil.which(program)
    assert real is not None, f"{program} is not installed"
    log = tmp_path / f"{program}.argv"
    wrapper = tmp_path / f"wrapped-{program}"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


@needs_root
def test_the_ssh_backend_runs_the_programs_the_distro_names(tmp_path: Path) -> None:
    root = seed_root(tmp_path / "root")
    useradd, useradd_log = _recording_wrapper(tmp_path, "useradd")
    keygen, keygen_log = _recording_wrapper(tmp_path, "ssh-keygen")
    paths = Distro(root, programs=Programs(useradd=str(useradd), ssh_keygen=str(keygen)))
    result = run_backend(paths, "ssh", {"users": [{"name": "alice"}]})
    assert result["ok"], result
    assert "alice" in useradd_log.read_text()
    assert "-A" in keygen_log.read_text().split()  # host keys made by the named ssh-keygen


def test_a_missing_program_is_named_in_the_refusal(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-ssh-keygen")
    assert not os.path.exists(missing)
    result = run_backend(Distro(tmp_path, programs=Programs(ssh_keygen=missing)), "ssh", {"users": []})
    assert not result["ok"]
    assert f"{missing} is not installed" in result["summary"]


def test_the_backends_write_the_files_the_distro_names(tmp_path: Path) -> None:
    """The built-in backends' own files come from Distro.files: another layout is written there,
    and cloudinit's policy protects what the distro says the backends install."""
    from imprint.backends import cloudpolicy
    from imprint.guest.distro import BackendFiles

    files = BackendFiles(tls_key="/opt/tls/vm.key", tls_cert="/opt/tls/vm.pem")
    result = run_backend(Distro(tmp_path, files=files), "x509", {"dns_names": ["web1"], "include_addresses": False})
    assert result["ok"], result
    assert (tmp_path / "opt/tls/vm.key").is_file()
    assert not (tmp_path / "etc/ssl/private/imprint.key").exists()
    protected = {path for path, _ in cloudpolicy.PROTECTED}
    assert set(BackendFiles().installed) <= protected and BackendFiles().cloud_config_work in protected
