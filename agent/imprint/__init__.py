"""imprint: owner-to-VM key exchange over any boot channel, without trusting the site.

Where things live (the README's layout table says the same):

    protocol/   the sans-IO exchange (messages, state machines, errors) and its one driver
    channels/   boot channels, both halves, one module and one registry line each
    backends/   contextualization backends, one package each, found through one entry point group
    guest/      the agent (imprint-agent); guest/distro.py holds every guest path and program
    owner/      the owner (imprint): home, store, bind, pinned client, profiles, fleets
    site/       the site tool (imprint-site): artefacts, reverse token, QEMU boots
    crypto, tls, tokens   the one crypto facade, TLS contexts and PinnedCert, token forms and Mode
    boundedio, fsatomic, safetext, lastresort, faults, timeouts, ports   shared by all three
"""

__version__ = "0.1.0"
