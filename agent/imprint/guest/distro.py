"""The guest's distribution, in one place: every guest path imprint reads or writes (resolved
under a root prefix, ``--root``) and every helper program the agent runs.

Like Ignition's ``distro`` package: the defaults are Debian's; another distribution, or a test,
makes its own ``Distro(root=..., programs=Programs(useradd="/opt/bin/useradd"))`` instead of
patching. A new guest path or program belongs here, used through the ``Distro`` the agent was started
with (``ctx.paths`` in a backend, ``paths`` in a channel); the built-in backends' own files are
``Distro.files`` (:class:`BackendFiles`). mtools is here too: guest/volumes.py runs it for the
agent, and the site's vfat seed builder (channels/_images.py) takes the same defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Programs:
    """Helper programs the agent runs, by name (found on PATH) or absolute path."""

    ssh_keygen: str = "ssh-keygen"      # openssh-client: host keys, fingerprints, certificates
    systemctl: str = "systemctl"        # reload sshd after a change
    useradd: str = "useradd"            # passwd: users the ssh backend creates
    chroot: str = "chroot"              # run the guest's own cloud-init under a --root
    python3: str = "/usr/bin/python3"   # the guest's interpreter, for its cloud-init
    modprobe: str = "modprobe"          # kmod: load qemu_fw_cfg for the fw_cfg channel
    # mtools: read a vfat seed (mdir, mtype, mshowfat) and wipe K from it (mmd, mcopy)
    mdir: str = "mdir"
    mtype: str = "mtype"
    mshowfat: str = "mshowfat"
    mmd: str = "mmd"
    mcopy: str = "mcopy"


@dataclass(frozen=True)
class BackendFiles:
    """The built-in backends' own guest files, as the guest names them (they also appear inside
    files the guest reads, and in results). The ssh backend's are the ``Distro`` paths below."""

    krb5_keytab: str = "/etc/krb5.keytab"            # kerberos: the default keytab_path
    krb5_conf: str = "/etc/krb5.conf"                # kerberos: gets an includedir of the snippets
    krb5_snippet_dir: str = "/etc/krb5.conf.d"
    tls_key: str = "/etc/ssl/private/imprint.key"    # x509: the defaults of key_path, cert_path, ...
    tls_cert: str = "/etc/ssl/certs/imprint.pem"
    tls_chain: str = "/etc/ssl/certs/imprint-chain.pem"
    tls_fullchain: str = "/etc/ssl/certs/imprint-fullchain.pem"
    cloud_config_applied: str = "/var/lib/imprint/cloud-config/applied"  # cloudinit: the digests applied
    cloud_config_started: str = "/var/lib/imprint/cloud-config/started"  # ... and the run under way
    cloud_config_work: str = "/run/imprint-cloud-config"  # the document for cloud-init (0700)

    @property
    def krb5_snippet(self) -> str:
        return f"{self.krb5_snippet_dir}/imprint.conf"

    @property
    def installed(self) -> tuple[str, ...]:
        """The files a backend installs and reports, which no other may write (a cloud-config's
        write_files: imprint.backends.cloudpolicy)."""
        return (self.krb5_keytab, self.krb5_snippet, self.tls_key, self.tls_cert, self.tls_chain, self.tls_fullchain)


@dataclass(frozen=True)
class Distro:
    root: Path = Path("/")
    programs: Programs = field(default_factory=Programs)
    files: BackendFiles = field(default_factory=BackendFiles)

    def under(self, absolute: str) -> Path:
        """``absolute`` (a guest path like /proc/cmdline) inside this root."""
        return self.root / absolute.lstrip("/")

    def guest(self, path: Path) -> str:
        """The guest path of ``path`` (which is under this root): how files in the guest name it."""
        return "/" + path.relative_to(self.root).as_posix().removeprefix(".")

    @property
    def is_real_root(self) -> bool:
        return self.root.resolve() == Path("/")

    @property
    def cmdline(self) -> Path:
        return self.under("/proc/cmdline")

    @property
    def state_dir(self) -> Path:
        return self.under("/var/lib/imprint")

    @property
    def console(self) -> Path:
        return self.under("/dev/console")

    @property
    def serial_ports(self) -> list[Path]:
        return [self.under("/dev/ttyS0")]

    def by_label(self, label: str) -> Path:
        return self.under(f"/dev/disk/by-label/{label}")

    def by_id(self, ident: str) -> Path:
        return self.under(f"/dev/disk/by-id/{ident}")

    @property
    def fw_cfg(self) -> Path:
        return self.under("/sys/firmware/qemu_fw_cfg")

    @property
    def credential_dirs(self) -> list[Path]:
        """$CREDENTIALS_DIRECTORY (set by systemd for the unit) first, then the system's."""
        dirs = []
        if env := os.environ.get("CREDENTIALS_DIRECTORY"):
            dirs.append(self.under(env))
        dirs.append(self.under("/run/credentials/@system"))
        return dirs

    @property
    def cloud_init_instance_data(self) -> Path:
        return self.under("/run/cloud-init/instance-data-sensitive.json")

    def cloud_init_user_data(self, instance_id: str) -> Path:
        """The raw user-data cloud-init stored for one instance (it names the directory after the
        instance id with '/' replaced by '_', as cloudinit.helpers.Paths does)."""
        return self.under(f"/var/lib/cloud/instances/{instance_id.replace('/', '_')}/user-data.txt")

    # -- written by the ssh backend (imprint.backends.ssh)
    @property
    def ssh_dir(self) -> Path:
        return self.under("/etc/ssh")

    @property
    def sshd_config_dir(self) -> Path:
        return self.under("/etc/ssh/sshd_config.d")

    @property
    def ssh_user_ca(self) -> Path:
        """imprint's TrustedUserCAKeys file."""
        return self.under("/etc/ssh/imprint_user_ca.pub")

    @property
    def passwd(self) -> Path:
        return self.under("/etc/passwd")

    @property
    def sudoers_dir(self) -> Path:
        return self.under("/etc/sudoers.d")
