# For Packer >= 1.7 only (1.6.6 rejects required_plugins): `packer init packer/plugins.pkr.hcl`
# installs the qemu builder that imprint.pkr.hcl uses; 1.6.6 has it built in.
packer {
  required_plugins {
    qemu = {
      version = ">= 1.0.0"
      source  = "github.com/hashicorp/qemu"
    }
  }
}
