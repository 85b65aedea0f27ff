"""The cloudinit backend's configuration as the agent receives it, checked by both sides. The
document (text or an object) is checked by the guest half against the policy
(imprint.backends.cloudpolicy), which a schema of keys and types cannot express."""

from __future__ import annotations

from imprint.backends.schema import Bool, Field, Obj

SCHEMA = Obj({"document": Field(), "always": Bool()})
