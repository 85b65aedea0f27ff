# Bakes imprint into a base image with the qemu builder and a shell provisioner.
#
# Works with Debian 12's packer package (1.6.6, builders built in; it rejects required_plugins,
# so the plugin requirement for newer Packer lives in plugins.pkr.hcl, which 1.6.6 never reads
# when it is given this file). Packer >= 1.7 without the built-in qemu builder:
#   packer init packer/plugins.pkr.hcl     (or: packer plugins install github.com/hashicorp/qemu)
#   packer build ... packer/imprint.pkr.hcl
#
# The base image has no password and no key for anyone, so the build VM gets a NoCloud seed (made
# by packer/build.sh) whose user-data authorizes a throw-away SSH key for root; the provisioner
# removes that key and generalizes the image (no host keys, no machine-id, cloud-init cleaned).
# packer/build.sh runs this template with every variable set.

packer {
  required_version = ">= 1.6.6"
}

variable "base_image" {
  type        = string
  description = "qcow2 to bake into (image-build/build.sh's bare.qcow2, or any Debian 12 image)"
}
variable "kernel" {
  type        = string
  description = "vmlinuz for direct kernel boot (the base image has no boot loader)"
}
variable "initrd" {
  type = string
}
variable "seed_iso" {
  type        = string
  description = "NoCloud seed (label cidata) authorizing ssh_public_key for root"
}
variable "ssh_private_key_file" {
  type = string
}
variable "wheel" {
  type        = string
  description = "the agent wheel (pip wheel --no-deps of this repository)"
}
variable "unit" {
  type    = string
  default = "systemd/imprint-agent.service"
}
variable "bake_script" {
  type    = string
  default = "image-build/bake-existing.sh"
}
variable "unpack_script" {
  type        = string
  default     = "image-build/unpack_wheel.py"
  description = "run by bake_script from its own directory: it unpacks the wheel"
}
variable "output_dir" {
  type    = string
  default = "output-imprint"
}
variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "tcg, or kvm where a KVM test boot works (imprint-site boot --accel auto tells)"
}

source "qemu" "imprint" {
  disk_image       = true
  iso_url          = var.base_image
  iso_checksum     = "none"
  format           = "qcow2"
  use_backing_file = false
  skip_compaction  = true
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  headless         = true
  memory           = 1024
  cpus             = 1
  output_directory = var.output_dir
  vm_name          = "imprint.qcow2"
  qemuargs = [
    ["-kernel", var.kernel],
    ["-initrd", var.initrd],
    ["-append", "root=LABEL=root rw console=ttyS0"],
    # A -drive here replaces the builder's own, so the disk being built is named too.
    ["-drive", "file=${var.output_dir}/imprint.qcow2,if=virtio,cache=writeback,discard=ignore,format=qcow2"],
    ["-drive", "file=${var.seed_iso},if=virtio,format=raw,readonly=on"],
    ["-serial", "file:${var.output_dir}-console.log"],
  ]
  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "10m"
  shutdown_command     = "systemctl poweroff"
  shutdown_timeout     = "5m"
}

build {
  sources = ["source.qemu.imprint"]

  provisioner "file" {
    source      = var.wheel
    destination = "/tmp/imprint.whl"
  }
  provisioner "file" {
    source      = var.unit
    destination = "/tmp/imprint-agent.service"
  }
  provisioner "file" {
    source      = var.bake_script
    destination = "/tmp/bake-existing.sh"
  }
  provisioner "file" {
    source      = var.unpack_script
    destination = "/tmp/unpack_wheel.py"
  }
  provisioner "shell" {
    inline = [
      "cloud-init status --wait >/dev/null 2>&1 || true",
      "bash /tmp/bake-existing.sh --wheel /tmp/imprint.whl --unit /tmp/imprint-agent.service --generalize --apt",
      "rm -f /tmp/imprint.whl /tmp/imprint-agent.service /tmp/bake-existing.sh /tmp/unpack_wheel.py /root/.ssh/authorized_keys",
      "/usr/local/bin/imprint-agent --help >/dev/null && echo 'imprint baked in'",
    ]
  }
}
