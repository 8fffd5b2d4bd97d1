"""The exception types the local stack raises: `DevStackError`, and its kinds a caller acts on."""

from __future__ import annotations


class DevStackError(Exception):
    """A component of the local stack could not be started, stopped or found.

    ``component`` names the part that failed (``"stack"`` for the stack as a whole);
    ``hint`` says what the user can do about it.
    """

    def __init__(self, component: str, problem: str, hint: str = "") -> None:
        self.component = component
        self.problem = problem
        self.hint = hint
        message = f"{component}: {problem}"
        if hint:
            message += f"\n  hint: {hint}"
        super().__init__(message)


class ExitedWhileStarting(DevStackError):
    """A component's server exited before it answered."""
