"""The backend plugin: the one object the entry-point group ``imprint.backends`` yields.

A backend is one package (``imprint.backends.ssh``, or a vendor's distribution) whose
``__init__`` declares one :class:`Backend` and registers it::

    [project.entry-points."imprint.backends"]
    motd = "imprint_motd:BACKEND"

The declaration is light (no halves are imported by it): the agent loads a backend's guest half
only when a profile names it, and the owner loads the owner half and the CLI hook only on its
side. Both sides validate the configuration with the same :attr:`Backend.schema`
(imprint.backends.schema): the owner before sending, the agent on receipt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import argparse

    from imprint.backends import BackendContext, BackendResult
    from imprint.backends.schema import Obj
    from imprint.owner.apply import ApplyContext, Review
    from imprint.owner.home import OwnerHome
    from imprint.owner.store import Store


class GuestHalf(Protocol):
    """What runs in the VM: validate (beyond the schema: keys, certificates), then act."""

    def __call__(self, ctx: BackendContext, config: dict[str, Any]) -> BackendResult: ...


class OwnerHalf(Protocol):
    """What runs on the owner's machine: the profile table -> the first round's config, and
    each answer -> notes, data, and perhaps one more round."""

    def prepare(self, ctx: ApplyContext, section: dict[str, Any]) -> dict[str, Any]: ...

    def review(self, ctx: ApplyContext, section: dict[str, Any], result: dict[str, Any], round: int) -> Review: ...


class OwnerCli(Protocol):
    """A backend's additions to the owner's command line (``imprint ssh``, ``ca init`` flags)."""

    def add_commands(self, sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
        """Extra subcommands; each sets ``func(home, args) -> exit code``."""

    def add_apply_options(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``imprint bind`` and ``imprint apply`` for this backend."""

    def apply_options(self, store: Store, vm: str, address: str, args: argparse.Namespace) -> dict[str, Any]:
        """The values those options give the owner half (``ApplyContext.options``)."""

    def add_ca_options(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``imprint ca init``."""

    def ca_init(self, home: OwnerHome, args: argparse.Namespace, *, default: bool
                ) -> tuple[dict[str, Any], list[str]] | None:
        """Make (or import) this backend's CA when the options ask for it, or when it is the
        ``default`` CA and no other backend's options were given: (JSON data, text lines);
        None when not asked."""


@dataclass(frozen=True)
class Backend:
    """A backend's declaration. ``guest``, ``owner`` and ``cli`` load their half when called."""

    name: str
    guest: Callable[[], GuestHalf]
    # The most rounds one apply takes (the owner stops a backend that asks for more).
    rounds: int = 1
    owner: Callable[[], OwnerHalf] | None = None
    schema: Obj | None = None
    # Guest paths it writes (documentation, and what cloudinit's policy keeps away from users).
    writes: tuple[str, ...] = ()
    cli: Callable[[], OwnerCli] | None = None
    # The CA ``imprint ca init`` makes when no option names another (one backend: ssh).
    default_ca: bool = False

    @property
    def needs_owner_half(self) -> bool:
        """False: the profile's table goes to the agent as it is (after the schema)."""
        return self.owner is not None


Registry = Mapping[str, Backend]
