"""What the agent receives: checked by the owner before sending and by the agent on receipt."""

from __future__ import annotations

import re

from imprint.backends.schema import Obj, Str

MAX_TEXT = 4096
SCHEMA = Obj({
    "text": Str(required=True, nonempty=True, max_len=MAX_TEXT),
    "vm": Str(required=True, pattern=re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"), what="a VM name"),
})
