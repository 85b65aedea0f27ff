"""A real MIT Kerberos realm for the kerberos backend tests: Debian's krb5kdc and kadmind on
loopback ports, in a temp dir with their own krb5.conf and kdc.conf (KRB5_CONFIG,
KRB5_KDC_PROFILE), an admin principal with a keytab and one with a password.

Setting it up takes about 0.3 s (kdb5_util create -s, a few kadmin.local queries, two daemons).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REALM = "TEST.IMPRINT"
ADMIN = f"imprint/admin@{REALM}"
PW_ADMIN = f"pwadmin/admin@{REALM}"
PW = "correct-horse-battery-staple"
needs_krb5 = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("krb5kdc", "kadmind", "kdb5_util", "kadmin.local", "kadmin", "kinit",
                                          "klist")),
    reason="needs Debian's krb5-kdc, krb5-admin-server and krb5-user (tools/bootstrap.sh installs them)",
)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Realm:
    dir: Path
    kdc_port: int = 0
    kadmind_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, KRB5_CONFIG=str(self.dir / "krb5.conf"), KRB5_KDC_PROFILE=str(self.dir / "kdc.conf"),
                    LC_ALL="C")

    @property
    def kdc(self) -> str:
        return f"127.0.0.1:{self.kdc_port}"

    @property
    def admin_server(self) -> str:
        return f"127.0.0.1:{self.kadmind_port}"

    @property
    def admin_keytab(self) -> Path:
        return self.dir / "admin.keytab"

    def start(self) -> Realm:
        self.kdc_port, self.kadmind_port, kpasswd = free_ports(3)
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "krb5.conf").write_text(
            f"[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n rdns = false\n"
            f" dns_canonicalize_hostname = false\n"
            f"[realms]\n {REALM} = {{\n  kdc = {self.kdc}\n  admin_server = {self.admin_server}\n }}\n")
        (d / "kdc.conf").write_text(
            f"[kdcdefaults]\n kdc_listen = {self.kdc}\n kdc_tcp_listen = {self.kdc}\n"
            f"[realms]\n {REALM} = {{\n  database_name = {d}/principal\n  key_stash_file = {d}/stash\n"
            f"  acl_file = {d}/kadm5.acl\n  kadmind_listen = {self.admin_server}\n"
            f"  kpasswd_listen = 127.0.0.1:{kpasswd}\n  kdc_listen = {self.kdc}\n  kdc_tcp_listen = {self.kdc}\n }}\n"
            f"[logging]\n kdc = FILE:{d}/kdc.log\n admin_server = FILE:{d}/kadmind.log\n")
        (d / "kadm5.acl").write_text(f"{ADMIN} *\n{PW_ADMIN} *\n")
        self.run("kdb5_util", "create", "-s", "-r", REALM, "-P", "master-password")
        self.local(f"addprinc -randkey {ADMIN}")
        self.local(f"ktadd -k {self.admin_keytab} {ADMIN}")
        self.local(f"addprinc -pw {PW} {PW_ADMIN}")
        for argv in (["krb5kdc", "-n"], ["kadmind", "-nofork"]):
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=(d / f"{argv[0]}.err").open("wb")))
        for port in (self.kdc_port, self.kadmind_port):
            self._wait(port)
        return self

    def _wait(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args} exited {proc.returncode}: {self.logs()}")
            time.sleep(0.02)
        raise AssertionError(f"nothing listens on {port} after {timeout} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("*.log")) if p.exists())

    def run(self, *argv: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=env or self.env, check=False)
        if check:
            assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
        return proc

    def local(self, query: str) -> str:
        """kadmin.local -q (which exits 0 even when the query fails: the caller looks at the text)."""
        proc = self.run("kadmin.local", "-r", REALM, "-q", query)
        return proc.stdout + proc.stderr

    def kvno(self, principal: str) -> int | None:
        out = self.local(f"getprinc {principal}")
        found = [int(v) for v in re.findall(r"Key: vno (\d+),", out)]
        return max(found) if found else None

    def kinit(self, keytab: Path, principal: str, *, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
        ccache = self.dir / f"cc-{time.monotonic_ns()}"
        args = ["kinit", "-k", "-c", f"FILE:{ccache}"] + (["-t", str(keytab)] if keytab else []) + [principal]
        return self.run(*args, check=False, env=env)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
