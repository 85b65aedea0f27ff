"""The guest agent (``imprint-agent``): finds the token, runs the exchange, serves the pinned
control channel.

    cli          the command line and the start-up: the token search, the key, READY
    distro       every guest path (under ``--root``) and every helper program, overridable
    server       the listener: the bind connection's exchange, then the pinned context
    connections  connection pools and absolute deadlines against floods and slow drips
    control      the pinned control channel's bounded HTTP/1.1 reader and its ROUTES
    state        state.json, the owner pin and consumed tokens, written durably
    log, notify  log lines (and the VM token announcement) on the console; sd_notify
    volumes, iso9660   reading seed volumes (ISO9660 with imprint's own bounded reader, vfat via mtools)

The boot channels themselves are :mod:`imprint.channels`; the backends :mod:`imprint.backends`.
"""
