"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with code 2.

Every error says what is wrong, where (file, key, column, line), and how to fix it.
Raise these for bad input; use `assert` only for programming bugs.
"""
from __future__ import annotations


class RlchatError(Exception):
    """Base class: `problem` says what is wrong and where, `fix` says what to do."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        msg = f"{self.problem}."
        if self.fix:
            msg += f" Fix: {self.fix.rstrip('.')}."
        return " ".join(msg.split())  # always one line


class ConfigError(RlchatError):
    """A bad flag, recipe key or value. May carry several problems, reported at once."""

    def __init__(self, problems: list[str] | str, fix: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        text = problems[0] if len(problems) == 1 else f"{len(problems)} config problems: " + "; ".join(
            p.rstrip(".") for p in problems)
        super().__init__(text, fix)


class DataError(RlchatError):
    """A dataset that is missing, empty, malformed or in an unknown format."""


class ModelError(RlchatError):
    """A model or tokenizer that cannot be found or is not what the stage needs."""


class RunDirError(RlchatError):
    """A problem with the run directory: missing parent stage, finished stage, lock, corrupt manifest."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), without a final '.'
    (for quoting a library's error inside a one-line RlchatError)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].rstrip(".")
