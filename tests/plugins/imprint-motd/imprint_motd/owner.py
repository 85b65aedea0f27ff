"""On the owner's machine: the profile table -> the agent's config; the answer -> a record."""

from __future__ import annotations

import hashlib
from typing import Any

from imprint.owner.apply import ApplyContext, Review
from imprint.owner.errors import UsageError


def prepare(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    if set(section) - {"text"}:
        raise UsageError(f"unknown key(s) {', '.join(sorted(set(section) - {'text'}))}; known: text")
    return {"text": section.get("text"), "vm": ctx.vm}  # the schema checks the text's type


def review(ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review:
    digest = hashlib.sha256(str(section["text"]).encode()).hexdigest()
    ctx.store.set_backend_data(ctx.vm, "motd", {"sha256": digest})
    return Review(notes=[f"recorded the message of the day of {ctx.vm} (sha256 {digest[:16]})"],
                  data={"sha256": digest})
