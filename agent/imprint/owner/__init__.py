"""The owner side: identity, tokens, binding, pinned requests, and the record of it all."""
