"""The owner side (``imprint``): identity, tokens, binding, pinned requests, and the record of it all.

    cli          the command line: parses, calls, prints (exit codes in its docstring)
    home         the owner home and every file in it
    store        the SQLite record: VMs, tokens, pins, per-VM backend data, the append-only audit
    bind         one bind: the exchange over TLS, the pin, the check over the pinned channel
    client       the pinned mutual-TLS client of a bound VM
    apply        profiles: each table to its backend's owner half, rounds, the report
    fleet, progress   binding many VMs at once (``bind --from``) and what it shows
    names        what a VM name and a HOST:PORT may be
    errors, tlsfailures   the exceptions (one per exit code) and the one classification of a failed connection
"""
