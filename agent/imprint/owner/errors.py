"""Owner-side failures, each with the exit code the CLI returns for it."""

from __future__ import annotations


class OwnerError(Exception):
    exit_code = 1
    # Set by Owner.bind(profile=...) when the VM was bound before this failure (an apply's):
    # the imprint.owner.api.Binding, so that a caller knows the VM is bound all the same.
    binding: object | None = None


class UsageError(OwnerError):
    """Bad usage or malformed input: a corrupt token, an unknown VM (exit 2)."""

    exit_code = 2


class AuthenticationFailed(OwnerError):
    """The peer could not be authenticated: a man in the middle, a wrong or reused token (exit 3)."""

    exit_code = 3


class Unreachable(OwnerError):
    """The agent did not answer, or not in time (exit 4)."""

    exit_code = 4


class ApplyFailed(OwnerError):
    """The profile reached the VM but at least one backend failed there (exit 5); the others ran."""

    exit_code = 5
    report: object | None = None  # the imprint.owner.apply.ApplyReport: which backend failed, and why
