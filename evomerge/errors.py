"""The one error type a user sees: a paragraph naming the problem and the fix, never a traceback."""

from __future__ import annotations


class EvomergeError(Exception):
    """A problem with the user's input or environment, stated with what to do about it.

    The CLI prints ``str(error)`` and exits with status 2; anything else that escapes is a bug.
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem.rstrip('.')}. {fix.rstrip('.')}.")
        self.problem = problem
        self.fix = fix
