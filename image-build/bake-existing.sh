#!/bin/bash
# Bakes the imprint agent into an existing Debian/Ubuntu-like system: the one a provisioner
# (Packer's shell provisioner, a kickstart %post, a Dockerfile-like chroot step) runs in, or a
# mounted root given with --root.
#
#   bake-existing.sh --wheel vm_imprint-*.whl --unit imprint-agent.service [--root DIR] [--generalize]
#
# What it does, and nothing else:
#   - checks the system's python3 (>= 3.11) has cryptography (Debian 12:
#     python3-cryptography; installs it with apt-get when missing and
#     --apt is given)
#   - unpacks the wheel into /usr/local/lib/python3.X/dist-packages (no pip needed in the
#     image), writes the console scripts imprint-agent, imprint, imprint-site to /usr/local/bin,
#     byte-compiles it (checked-hash .pyc: no timestamps, still safe if a source file changes)
#   - installs the unit to /usr/local/lib/systemd/system and enables it (multi-user.target)
#   - removes /var/lib/imprint: a baked image carries no bind state, key or token
#   - --generalize: also removes what makes one machine differ from another, so each VM
#     booted from the image gets its own: SSH host keys, /etc/machine-id (emptied: systemd makes
#     a fresh one at boot; "uninitialized" would mean first boot, and Debian's
#     systemd-firstboot.service would prompt on the console), cloud-init's state (cloud-init clean)
set -euo pipefail

root=/ wheel= unit= generalize=0 apt=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    --unit) unit=$2; shift 2 ;;
    --generalize) generalize=1; shift ;;
    --apt) apt=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bake-existing: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "bake-existing: --wheel FILE is required" >&2; exit 2; }
[ -n "$unit" ] && [ -f "$unit" ] || { echo "bake-existing: --unit FILE is required" >&2; exit 2; }
root=$(cd "$root" && pwd)
say() { echo "bake-existing: $*"; }

# Runs a command in the target system (chroot when --root is not /).
in_target() { if [ "$root" = / ]; then "$@"; else chroot "$root" "$@"; fi; }

if ! in_target python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "bake-existing: the target needs python3 >= 3.11" >&2; exit 1
fi
if ! in_target python3 -c 'import cryptography' 2>/dev/null; then
  if [ "$apt" = 1 ]; then
    say "installing python3-cryptography with apt-get"
    in_target env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      python3-cryptography
  else
    echo "bake-existing: the target's python3 lacks cryptography (Debian: python3-cryptography; or pass --apt)" >&2
    exit 1
  fi
fi
pyver=$(in_target python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
site="/usr/local/lib/python$pyver/dist-packages"

say "unpacking $(basename "$wheel") into $site"
mkdir -p "$root$site" "$root/usr/local/bin"
# The wheel is pure Python: unpacking it is a complete install (pip would do the same plus RECORD).
"${PYTHON:-/usr/bin/python3}" "$(dirname "$0")/unpack_wheel.py" "$wheel" "$root" "$site"
in_target python3 -m compileall -q --invalidation-mode checked-hash "$site/imprint" >/dev/null

say "installing the unit $(basename "$unit")"
install -D -m 0644 "$unit" "$root/usr/local/lib/systemd/system/imprint-agent.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sfn /usr/local/lib/systemd/system/imprint-agent.service \
  "$root/etc/systemd/system/multi-user.target.wants/imprint-agent.service"

rm -rf "$root/var/lib/imprint"
if [ "$generalize" = 1 ]; then
  say "generalizing: no SSH host keys, empty machine-id, cloud-init state cleaned"
  rm -f "$root"/etc/ssh/ssh_host_*
  : > "$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  if [ -x "$root/usr/bin/cloud-init" ]; then in_target cloud-init clean --logs >/dev/null 2>&1 || true; fi
fi
say "done: imprint-agent.service enabled (first boot looks for a token; a bound VM does not)"
