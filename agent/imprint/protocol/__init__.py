"""The key exchange: the sans-IO core (messages.py: wire format; exchange.py: the two state
machines and their transition tables; errors.py: local and remote errors apart) and the one
driver that does its I/O for the agent, the owner and the tests (driver.py, imported on its own).
See docs/protocol.md §2.
"""

from imprint.protocol.errors import AlertCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from imprint.protocol.exchange import (
    Event,
    ExchangeComplete,
    OwnerAuthenticated,
    OwnerExchange,
    State,
    VmAuthenticated,
    VmExchange,
)

__all__ = [
    "AlertCode",
    "Event",
    "ExchangeComplete",
    "LocalProtocolError",
    "OwnerAuthenticated",
    "OwnerExchange",
    "ProtocolError",
    "RemoteProtocolError",
    "State",
    "VmAuthenticated",
    "VmExchange",
]
