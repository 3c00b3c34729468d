"""The exception the CLI turns into a one-line message and exit status 2, and the exit codes themselves."""

from enum import IntEnum


class CqilError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


class ExitCode(IntEnum):
    """What `cqil` (and every rank of a multi-process run) exits with, so CI can tell a regression from a broken run."""

    OK = 0
    CHECK_FAILED = 1  # a check ran and failed: validate, gate, verify
    BAD_INPUT = 2  # the input or the output location is wrong: nothing ran
    INTERNAL_ERROR = 3  # a bug in cqil
    RUN_FAILED = 4  # a multi-process run broke: a rank died or failed to load, a collective timed out
    INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C)
    TERMINATED = 143  # 128 + SIGTERM


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C (finally blocks and atomic writes clean up), then
    the command exits 128 + the signal's number, as a shell reports a process the signal killed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
