#!/bin/bash
# Bakes imprint into a base image with Packer (packer/imprint.pkr.hcl, Debian 12's packer 1.6.6):
#
#   packer/build.sh --image-dir DIR [--out DIR] [--accel tcg|kvm]
#
# DIR holds bare.qcow2 (the base to bake into), vmlinuz, initrd.img and the agent wheel, as
# image-build/build.sh leaves them. Writes OUT/imprint.qcow2 (plus vmlinuz and initrd.img next
# to it, for direct kernel boot) and OUT/console.log of the build VM.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
image_dir="" out="" accel=tcg
while [ $# -gt 0 ]; do
  case "$1" in
    --image-dir) image_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    *) echo "packer/build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$image_dir" ] || { echo "packer/build.sh: --image-dir is required" >&2; exit 2; }
image_dir=$(cd "$image_dir" && pwd)
out=$(mkdir -p "${out:-$repo/packer/output}" && cd "${out:-$repo/packer/output}" && pwd)
wheel=$(ls "$image_dir"/*.whl | head -1)
work=$(mktemp -d "${TMPDIR:-/tmp}/imprint-packer.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A throw-away key for the build only; the provisioner deletes its authorization.
ssh-keygen -q -t ed25519 -N "" -C packer-build -f "$work/id"
cat > "$work/user-data" <<UD
#cloud-config
disable_root: false
ssh_authorized_keys:
  - $(cat "$work/id.pub")
UD
printf 'instance-id: packer-build\nlocal-hostname: packer-build\n' > "$work/meta-data"
genisoimage -quiet -output "$work/seed.iso" -volid cidata -joliet -rock "$work/user-data" "$work/meta-data"

cd "$repo"
export PACKER_CACHE_DIR="$work/packer_cache"   # not ./packer_cache in the checkout
packer build -force \
  -var "base_image=$image_dir/bare.qcow2" -var "kernel=$image_dir/vmlinuz" -var "initrd=$image_dir/initrd.img" \
  -var "seed_iso=$work/seed.iso" -var "ssh_private_key_file=$work/id" -var "wheel=$wheel" \
  -var "output_dir=$work/output" -var "accelerator=$accel" \
  packer/imprint.pkr.hcl
mv -f "$work/output/imprint.qcow2" "$out/imprint.qcow2"
cp "$image_dir/vmlinuz" "$image_dir/initrd.img" "$out/"
cp "$work/output-console.log" "$out/console.log" 2>/dev/null || true
echo "packer/build.sh: $out/imprint.qcow2"
