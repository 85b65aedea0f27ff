#!/usr/bin/env bash
# The real demo: build (or reuse) the imprint image, boot it as an untrusted site would, bind it
# in no-secrets mode with the VM token the site relays from the serial console, and talk to it
# over the pinned channel; saying what each step proves. Run as root (the image build needs it).
#   bash tools/vm-demo.sh [--channel fw_cfg|cmdline|metadata-disk|nocloud-iso|...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
channel=fw_cfg
if [ "${1:-}" = "--channel" ]; then channel=$2; fi
bash tools/bootstrap.sh >/dev/null
bash image-build/bootstrap.sh >/dev/null
py="$here/.venv/bin/python"
say() { printf '\n== %s\n' "$*"; }

say "1. the image (built from Debian packages, or reused from the cache when its inputs did not change)"
img=$("$py" -c 'from tests.vm import ensure_image; print(ensure_image().dir)')
echo "$img/base.qcow2  sha256 $(sha256sum "$img/base.qcow2" | cut -c1-16)…  (no token, key or site address inside)"

work=$(mktemp -d /tmp/imprint-demo.XXXXXX)
cleanup() { "$py" -m imprint.site stop "$work/vm" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
imprint() { "$py" -m imprint.owner --home "$work/owner" "$@"; }

say "2. the owner makes a no-secrets token: the hash of the owner's key, nothing secret"
imprint init >/dev/null
imprint token new demo --mode nosecret | tail -1 > "$work/token"
cat "$work/token"

say "3. the site boots the image with the token on the $channel channel (QEMU, overlay disk)"
"$py" -m imprint.site boot --image "$img/base.qcow2" --channel "$channel" --token-file "$work/token" \
  --run-dir "$work/vm" > "$work/boot.json"
field() { "$py" -c "import json,sys; print(json.load(open('$work/boot.json'))['$1'])"; }
echo "agent ready after $(field seconds_to_status) s at $(field agent_address); SSH forwarded to $(field ssh_address)"
echo "the VM printed its VM token on the console; the site relays it: $(field vm_token)"

say "4. the owner binds: keys checked against both tokens, transcript signed by both, keys pinned"
imprint bind demo --address "$(field agent_address)" --vm-token "$(field vm_token)"

say "5. the pinned mutual-TLS channel: the VM accepts only this owner, the owner only this VM"
imprint status demo

say "6. the base image is unchanged (the VM ran on an overlay)"
sha256sum "$img/base.qcow2" | cut -c1-16
