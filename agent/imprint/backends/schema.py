"""One schema facility for backend configurations: declared once, checked the same way by the
owner (before a round is sent) and by the agent (on receipt).

A backend declares the shape of what the agent receives::

    SCHEMA = Obj({
        "text": Str(max_len=4096, required=True),
        "users": List(Obj({"name": Str(pattern=USER_NAME_RE, what="a user name")}), max_items=100),
    })

and :func:`check` (``SCHEMA.check(config, "motd")``) raises :class:`ConfigError` whose message
starts with the field's path: ``motd.text must be str, not int``, ``ssh.users[2].name 'Bad'
is not a user name``. The framework turns it into the side's own error (BackendError in the VM,
UsageError on the owner). What a schema cannot say (a key that ssh-keygen must accept) stays in
the backend's guest half. A JSON null counts as absent, as in the older hand-written checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the field's path."""


@dataclass(frozen=True)
class Field:
    """A value of any type (the base of the typed fields below)."""

    required: bool = field(default=False, kw_only=True)

    def check(self, value: Any, path: str) -> None:
        """Raise ConfigError if ``value`` (at ``path``) does not fit."""


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path} must be {expected}, not {type(value).__name__}")


@dataclass(frozen=True)
class Str(Field):
    pattern: re.Pattern[str] | None = None
    what: str = ""          # what the pattern means, for the error: "a user name"
    max_len: int | None = None
    nonempty: bool = False
    choices: tuple[str, ...] = ()

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _type_error(path, "str", value)
        if self.nonempty and not value:
            raise ConfigError(f"{path} must be a non-empty string")
        if self.max_len is not None and len(value) > self.max_len:
            raise ConfigError(f"{path} is {len(value)} characters long; at most {self.max_len}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{path} {value[:80]!r} is not one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.match(value):
            raise ConfigError(f"{path} {value[:80]!r} is not {self.what or 'well-formed'}")


@dataclass(frozen=True)
class Int(Field):
    min: int | None = None
    max: int | None = None

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be an integer, not a boolean")
        if not isinstance(value, int):
            raise _type_error(path, "int", value)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ConfigError(f"{path} {value} is out of range ({self.min} to {self.max})")


@dataclass(frozen=True)
class Bool(Field):
    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _type_error(path, "bool", value)


@dataclass(frozen=True)
class List(Field):
    item: Field = field(default_factory=Field)
    max_items: int = 1000

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _type_error(path, "list", value)
        if len(value) > self.max_items:
            raise ConfigError(f"{path} has {len(value)} items; at most {self.max_items}")
        for i, item in enumerate(value):
            if isinstance(self.item, Str) and not isinstance(item, str):
                raise ConfigError(f"{path}[{i}] must be a string, not {type(item).__name__}")
            self.item.check(item, f"{path}[{i}]")


@dataclass(frozen=True)
class Obj(Field):
    fields: Mapping[str, Field] = field(default_factory=dict)
    # A field (checked first) whose value then labels the object in the other fields' errors:
    # ``ssh.users[0] (alice).sudo must be bool``.
    label: str | None = None

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be an object, not {type(value).__name__}")
        unknown = sorted(set(value) - set(self.fields), key=str)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(self.fields))}")
        keys = sorted(self.fields, key=lambda key: key != self.label)  # the label first
        where = path
        for key in keys:
            spec = self.fields[key]
            if value.get(key) is None:
                if spec.required:
                    raise ConfigError(f"{where}.{key} is required")
                continue
            spec.check(value[key], f"{where}.{key}")
            if key == self.label:
                where = f"{path} ({value[key]})"


def check(schema: Obj, config: Any, name: str) -> None:
    """``config`` of the backend ``name`` fits ``schema``, or ConfigError naming the field."""
    schema.check(config, name)
