"""The site side (``imprint-site``): channel artefacts for a VM's token, and reading the VM token back.

    cli      the command line
    seeds    the front to the channels' artefact builders (:mod:`imprint.channels` owns them)
    reverse  the VM token from a console log (the reverse channel)
    vm       QEMU boots with any channel, the KVM probe, console follow, QMP hot-plug
"""
