#!/bin/bash
# mmdebstrap customize hook of build.sh: $1 is the root filesystem (on the host). Makes the
# Debian root bootable in QEMU and generic: nothing in it belongs to a site or a machine.
set -euo pipefail
root=$1
files=$(cd "$(dirname "$0")/files" && pwd)
say() { echo "customize: $*"; }

say "initramfs with the modules the boot channels need (virtio, iso9660, vfat, qemu_fw_cfg)"
cat > "$root/etc/initramfs-tools/modules" <<'MODS'
# imprint base image: the root disk, the seed volumes, fw_cfg (systemd imports fw_cfg
# credentials at start-up, so qemu_fw_cfg is loaded in the initramfs), the network
virtio_pci
virtio_blk
virtio_net
virtio_scsi
iso9660
vfat
nls_cp437
nls_ascii
qemu_fw_cfg
MODS
chroot "$root" update-initramfs -u -k all 2>&1 | sed 's/^/  /'

say "fstab (root by label), hostname, network (systemd-networkd, DHCP on every wired link)"
echo 'LABEL=root / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"
echo debian > "$root/etc/hostname"
# mmdebstrap copied the build host's resolv.conf: the image gets none of the host's addresses
echo "# no resolver is baked into the image" > "$root/etc/resolv.conf"
printf '127.0.0.1 localhost\n127.0.1.1 debian\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
chmod 0644 "$root/etc/hostname" "$root/etc/resolv.conf" "$root/etc/fstab" "$root/etc/hosts"
install -D -m 0644 "$files/20-wired.network" "$root/etc/systemd/network/20-wired.network"
systemctl --root="$root" enable systemd-networkd.service systemd-networkd-wait-online.service 2>&1 | sed 's/^/  /'
# network-online as soon as one link is configured (one NIC), bounded
install -d "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'CONF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
CONF

say "cloud-init: local seeds only, C.UTF-8, ed25519 host key, network left to networkd"
install -D -m 0644 "$files/90-imprint-image.cfg" "$root/etc/cloud/cloud.cfg.d/90-imprint-image.cfg"

say "SSH: no host key in the image; ssh-hostkeys.service makes one at first boot"
rm -f "$root"/etc/ssh/ssh_host_*
install -D -m 0644 "$files/ssh-hostkeys.service" "$root/etc/systemd/system/ssh-hostkeys.service"
mkdir -p "$root/etc/systemd/system/ssh.service.wants"
ln -sfn /etc/systemd/system/ssh-hostkeys.service "$root/etc/systemd/system/ssh.service.wants/ssh-hostkeys.service"

say "generic machine: empty machine-id (a fresh one at each VM's first boot), root locked, no logs"
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
chroot "$root" passwd -l root >/dev/null
rm -rf "$root"/var/log/journal/* "$root"/var/lib/cloud/* "$root"/var/lib/imprint
find "$root/var/log" -type f -exec truncate -s 0 {} +
rm -f "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root/var/cache/ldconfig/aux-cache"
