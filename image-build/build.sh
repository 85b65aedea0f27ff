#!/bin/bash
# Builds the imprint base image: a bootable Debian 12 qcow2 with the agent baked in, from
# Debian's packages only. One command, as root (mmdebstrap --mode=root, mkfs.ext4 -d):
#
#   image-build/build.sh [--out DIR] [--size 2G] [--suite bookworm]
#
# Output in DIR (default $IMPRINT_IMAGE_CACHE/image, IMPRINT_IMAGE_CACHE defaults to
# ~/.cache/imprint-image):
#   base.qcow2     the image with imprint (unit enabled, no token, no key, no SSH host key)
#   bare.qcow2     the same root filesystem without imprint (benchmarks, Packer's base image)
#   vmlinuz, initrd.img   Debian's cloud kernel and its initramfs, for direct kernel boot:
#                  -kernel vmlinuz -initrd initrd.img -append "root=LABEL=root rw console=ttyS0"
#   manifest.json  inputs, package versions, sizes, sha256 of every output
# Downloaded packages are cached in $IMPRINT_IMAGE_CACHE/apt (a rebuild downloads nothing).
# Reproducibility: see image-build/README.md (SOURCE_DATE_EPOCH, fixed filesystem UUID and
# hash seed, mtimes clamped; what still differs between two builds is listed there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${IMPRINT_IMAGE_CACHE:-$HOME/.cache/imprint-image}
out="" size=2G suite=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=${out:-$cache/image}
start=$(date +%s)
step() { echo "build [$(( $(date +%s) - start ))s]: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "build: run as root (mmdebstrap --mode=root, mkfs.ext4 -d keep ownership)" >&2; exit 1; }
need=()
for tool in mmdebstrap:mmdebstrap qemu-img:qemu-utils mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
# Debian's own python3 builds the wheel (not whatever python3 comes first in PATH)
py=/usr/bin/python3
for deb in python3 python3-pip python3-wheel python3-setuptools; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || need+=("$deb")
done
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]} with apt-get"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# Fixed time for everything that records one (dpkg logs, initramfs, wheel, mtimes, mkfs).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 1700000000)}
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
mkdir -p "$cache/apt" "$out"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/imprint-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "building the agent wheel (pip wheel --no-deps) from $repo"
mkdir -p "$work/src" "$work/wheel"
cp -r "$repo/pyproject.toml" "$repo/agent" "$work/src/"
# The wheel's long description: a stub, so editing the project README does not change the image
echo "imprint: owner-to-VM key exchange (the agent baked into imprint images)" > "$work/src/README.md"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} + -o -name '*.egg-info' -prune -exec rm -rf {} +
"$py" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$work/wheel" "$work/src" \
  2>&1 | { grep -v '^WARNING: Location' || true; }
wheel_file=$(ls "$work/wheel"/*.whl)

packages=(systemd-sysv udev kmod iproute2 e2fsprogs linux-image-cloud-amd64 initramfs-tools
          python3 python3-cryptography python3-pycdlib python3-pyroute2 mtools
          openssh-server cloud-init ca-certificates dbus)
pkg_list=$(IFS=,; echo "${packages[*]}")
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
step "mmdebstrap $suite ($(echo "${packages[@]}")), package cache $cache/apt"
rootfs="$work/rootfs"
# Hooks run on the host with $1 = the root filesystem.
mmdebstrap --mode=root --variant=apt --format=directory --include="$pkg_list" \
  --aptopt='Acquire::Retries "3"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
  --setup-hook="sync-in $cache/apt /var/cache/apt/archives/" \
  --customize-hook="sync-out /var/cache/apt/archives $cache/apt" \
  --customize-hook="$here/customize.sh \"\$1\"" \
  "$suite" "$rootfs" "$sources" 2>&1 | sed -u 's/^/  /'

step "package versions"
chroot "$rootfs" dpkg-query -W -f='${Package} ${Version}\n' > "$work/packages.txt"
grep -E '^(linux-image-[0-9]|systemd |python3 |python3-cryptography |openssh-server |cloud-init )' "$work/packages.txt" | sed 's/^/  /'
cp "$rootfs"/boot/vmlinuz-* "$work/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$work/initrd.img"

make_disk() {  # make_disk ROOTFS NAME: ext4 labelled root, fixed UUID and hash seed, then qcow2
  local name=$2
  # every mtime clamped to SOURCE_DATE_EPOCH (files written by hooks and postinsts)
  find "$1" -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  truncate -s "$size" "$work/$name.raw"
  mkfs.ext4 -q -F -L root -U 6c1b2a8e-0f4d-4b8e-9a51-1d2e3f4a5b6c -E hash_seed=0d7c2f51-8a3e-4f11-9b7d-5e6a7b8c9d0e \
    -d "$1" "$work/$name.raw"
  qemu-img convert -O qcow2 "$work/$name.raw" "$work/$name.qcow2"
  rm -f "$work/$name.raw"
}
step "bare.qcow2: the root filesystem without imprint"
make_disk "$rootfs" bare
bare_bytes=$(du -sb --exclude=./proc --exclude=./sys "$rootfs" | cut -f1)

step "baking the agent in (image-build/bake-existing.sh --root)"
"$here/bake-existing.sh" --root "$rootfs" --wheel "$wheel_file" --unit "$repo/systemd/imprint-agent.service" \
  | sed -u 's/^/  /'
step "base.qcow2: the image with imprint"
make_disk "$rootfs" base
base_bytes=$(du -sb "$rootfs" | cut -f1)

for f in base.qcow2 bare.qcow2 vmlinuz initrd.img; do mv -f "$work/$f" "$out/$f"; done
cp "$wheel_file" "$out/"
cp "$work/packages.txt" "$out/packages.txt"
"$py" "$here/write_manifest.py" "$out" "$SOURCE_DATE_EPOCH" "$bare_bytes" "$base_bytes" "$suite" "$(basename "$wheel_file")"
step "done: $out/{base.qcow2,bare.qcow2,vmlinuz,initrd.img,manifest.json}"
ls -l "$out" | sed 's/^/  /'
