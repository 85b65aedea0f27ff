"""The sans-IO key-exchange core. See exchange.py and docs/protocol.md."""

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
