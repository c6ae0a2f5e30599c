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

    def lines(self) -> list[str]:
        """The message as the CLI prints it after `error: `: one line (ConfigError: one per problem)."""
        return [self.one_line()]


class ConfigError(RlchatError):
    """A bad flag, recipe key or value. May carry several problems, reported at once.

    `one_line()` joins them ("3 config problems: a; b; c"), for logs and the manifest; the CLI prints
    `lines()`: a short head ("3 problems in the sft config:"), one indented line per problem, then the fix."""

    def __init__(self, problems: list[str] | str, fix: str | None = None, subject: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.subject = subject  # what the problems are in: "the sft config", "recipe r.yaml"
        text = problems[0] if len(problems) == 1 else f"{len(problems)} config problems: " + "; ".join(
            p.rstrip(".") for p in problems)
        super().__init__(text, fix)

    def lines(self) -> list[str]:
        if len(self.problems) == 1:
            return [self.one_line()]
        head = f"{len(self.problems)} problems in {self.subject or 'the config'}:"
        body = ["  - " + " ".join(p.rstrip(".").split()) for p in self.problems]
        return [head] + body + ([f"Fix: {self.fix.rstrip('.')}."] if self.fix else [])


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


class UnexpectedError(RlchatError):
    """An exception rlchat does not know (a bug, or an input it does not check yet), turned into one line by the
    last line of defence: it names the command or stage, the error type and message, and the log file holding the
    full traceback. Exit code 1, so scripts can tell it from a user error (2)."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by rlchat's handler so a stage is left "interrupted" (like Ctrl-C) and the
    process exits 143. A KeyboardInterrupt so that every `except KeyboardInterrupt` treats both the same."""

    signum = 15


INTERRUPTED = "interrupted: rerun the same command to resume"


def interrupt_exit_code(err: BaseException | None) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM: 128 + the signal number, as shells report them."""
    while err is not None:
        if isinstance(err, Terminated):
            return 128 + err.signum
        err = err.__cause__ or err.__context__
    return 130


def write_traceback_log(err: BaseException, path=None) -> str | None:
    """Write `err`'s full traceback to `path` (or to a new temp file `rlchat-error-*.log` when None); returns the
    path written, or None if nothing could be written."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        if path is None:
            fd, path = tempfile.mkstemp(prefix="rlchat-error-", suffix=".log")
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
    except OSError:
        return None
    return str(path)


def unexpected(where: str, err: BaseException, log_path=None) -> UnexpectedError:
    """`err` (not an RlchatError) as the one-line UnexpectedError of `where` ("rlchat status", "stage 'sft'"), with
    its traceback written to `log_path` (or a temp file)."""
    written = write_traceback_log(err, log_path)
    msg = " ".join(str(err).split())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    where_log = f"the full traceback is in {written}" if written else "no traceback log could be written"
    return UnexpectedError(f"{where} failed unexpectedly: {type(err).__name__}" + (f": {msg}" if msg else ""),
                           f"{where_log}; this input is not checked yet or rlchat has a bug: please report it "
                           "with that log")
