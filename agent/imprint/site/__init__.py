"""The site side: channel artefacts for a VM's token, and reading the VM token back."""
