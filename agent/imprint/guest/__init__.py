"""The guest agent: finds the token, runs the exchange, serves the pinned control channel."""
