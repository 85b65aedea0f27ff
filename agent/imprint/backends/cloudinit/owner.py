"""The owner's half of the cloudinit backend: read the cloud-config document on the owner's
machine and send it over the pinned channel (the site never sees it).

Profile table (see imprint.owner.apply), exactly one of ``file``, ``document``, ``config``::

    [cloudinit]
    file = "web1.user-data"        # a #cloud-config file (relative: to the current directory)
    # document = "#cloud-config\\n..."   # the same, inline
    # config = { write_files = [...] }     # or the document as a TOML table
    always = false                 # true: run it even if the VM applied this very document

The agent validates it with cloud-init's own schema and applies it with cloud-init's own module
runner (imprint.backends.cloudinit); one round, nothing to review.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imprint.boundedio import InputError, read_file
from imprint.owner.apply import ApplyContext, Review
from imprint.owner.errors import UsageError

MAX_DOCUMENT = 1 << 20


def prepare(ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(section) - {"file", "document", "config", "always"})
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; known: always, config, document, file")
    given = [k for k in ("file", "document", "config") if k in section]
    if len(given) != 1:
        raise UsageError("give exactly one of file, document and config")
    config: dict[str, Any] = {}
    if "always" in section:
        if not isinstance(section["always"], bool):
            raise UsageError("always must be true or false")
        config["always"] = section["always"]
    if "config" in section:
        if not isinstance(section["config"], dict) or not section["config"]:
            raise UsageError("config must be a non-empty table of cloud-config keys")
        # The agent enforces the policy on every document; a table is checked here too, so that
        # `bind --profile` refuses it before the token is spent (text would need a YAML parser).
        from imprint.backends import BackendError, cloudpolicy

        try:
            cloudpolicy.check(section["config"])
        except BackendError as exc:
            raise UsageError(str(exc)) from None
        return {**config, "document": section["config"]}
    if "file" in section:
        if not isinstance(section["file"], str):
            raise UsageError("file must be a path")
        path = Path(section["file"]).expanduser()
        try:
            data = read_file(path, MAX_DOCUMENT, follow_links=True)  # bounded; a FIFO is refused, not waited on
            if data is None:
                raise UsageError(f"{path} does not exist")
            text = data.decode()
        except InputError as exc:
            raise UsageError(str(exc)) from None  # it names the file
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text") from None
    else:
        text = section["document"]
        if not isinstance(text, str):
            raise UsageError("document must be a string")
    if not text.startswith("#cloud-config"):
        raise UsageError("the document must begin with '#cloud-config' (the only user-data type applied)")
    return {**config, "document": text}


def review(ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review:
    return Review()
