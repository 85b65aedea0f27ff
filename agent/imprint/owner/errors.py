"""Owner-side failures, each with the exit code the CLI returns for it."""

from __future__ import annotations


class OwnerError(Exception):
    exit_code = 1


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
