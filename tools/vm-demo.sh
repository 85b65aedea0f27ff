#!/usr/bin/env bash
# The real demo: build (or reuse) the imprint image, boot it as an untrusted site would, bind it
# in no-secrets mode with the VM token the site relays from the serial console, have the agent
# attest the VM's SSH host key over the pinned channel, and log in with OpenSSH trusting only that
# key; saying what each step proves. Run as root (the image build needs it).
#   bash tools/vm-demo.sh [--channel fw_cfg|cmdline|metadata-disk|nocloud-iso|...] [--interactive]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
channel=fw_cfg
interactive=no
while [ $# -gt 0 ]; do
  case $1 in
    --channel) channel=$2; shift 2 ;;
    --interactive) interactive=yes; shift ;;
    *) echo "usage: $0 [--channel NAME] [--interactive]" >&2; exit 2 ;;
  esac
done
bash tools/bootstrap.sh >/dev/null
bash image-build/bootstrap.sh >/dev/null
py="$here/.venv/bin/python"
say() { printf '\n== %s\n' "$*"; }

say "1. the image (built from Debian packages, or reused from the cache when its inputs did not change)"
img=$("$py" -c 'from tests.helpers.vm import ensure_image; print(ensure_image().dir)')
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

say "6. the owner applies an SSH profile over the pinned channel: the agent creates user 'demo' with the"
echo "   owner's key and attests the VM's SSH host key; the owner writes it to its own known_hosts (no TOFU)"
ssh-keygen -q -t ed25519 -N "" -C demo-owner -f "$work/id_demo"
printf '[ssh]\nusers = [{name = "demo", authorized_keys = ["%s"]}]\n' "$(cat "$work/id_demo.pub")" > "$work/profile.toml"
ssh_port=$(field ssh_port)
imprint apply demo --profile "$work/profile.toml" --ssh-port "$ssh_port"
cat "$work/owner/known_hosts/demo"
echo "attested host key fingerprint: $(ssh-keygen -lf "$work/owner/known_hosts/demo" | cut -d' ' -f2)"

say "7. OpenSSH with StrictHostKeyChecking=yes and only the attested key: the owner logs in"
"$py" -m imprint.site wait-ssh "$work/vm" >/dev/null
login=(-- -i "$work/id_demo" -o IdentitiesOnly=yes -o BatchMode=yes -F /dev/null)
imprint ssh demo -l demo --print "${login[@]}"
imprint ssh demo -l demo "${login[@]}" \
  'echo "logged in as $(id -un) on $(hostname); the VM says its host key is $(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d" " -f2)"'

say "8. a known_hosts with any other host key for this address (another VM's, a MITM's) is refused"
ssh-keygen -q -t ed25519 -N "" -C other-vm -f "$work/other_host_key"
echo "[127.0.0.1]:$ssh_port $(cut -d' ' -f1,2 "$work/other_host_key.pub")" > "$work/other_known_hosts"
if ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$work/other_known_hosts" \
     -o GlobalKnownHostsFile=/dev/null -i "$work/id_demo" -o IdentitiesOnly=yes -p "$ssh_port" demo@127.0.0.1 true \
     2> "$work/refused.txt"; then
  echo "UNEXPECTED: ssh accepted a host key the agent did not attest" >&2; exit 1
fi
grep -E "Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED" "$work/refused.txt" | sort -u

if [ "$interactive" = yes ]; then
  say "an interactive session (exit to stop the VM)"
  imprint ssh demo -l demo -- -i "$work/id_demo" -o IdentitiesOnly=yes -F /dev/null
fi

say "9. the base image is unchanged (the VM ran on an overlay)"
sha256sum "$img/base.qcow2" | cut -c1-16
