#!/bin/bash
# Installs what building and booting images needs on Debian 12 (apt-get; as root or with sudo):
# mmdebstrap, QEMU (system emulator and qemu-img), e2fsprogs (mkfs.ext4 -d, debugfs), Packer 1.6.6,
# Debian's python3 with pip/wheel/setuptools for the agent wheel, ssh-keygen and genisoimage
# (Packer's build key and seed, bench_boot.py's cloud-init key).
set -euo pipefail
debs=(mmdebstrap qemu-system-x86 qemu-utils e2fsprogs packer python3 python3-pip python3-wheel python3-setuptools
      openssh-client genisoimage)
bash "$(cd "$(dirname "$0")/.." && pwd)/tools/apt-ensure.sh" image-build/bootstrap "${debs[@]}"

