"""The project's own exceptions: each message is one sentence saying what is wrong and how to fix it."""

from typing import NoReturn


class PolypythiaError(Exception):
    """Base class for errors a user can cause and fix."""


class ConfigError(PolypythiaError):
    """A job configuration is invalid; raised before any job starts."""


class DataError(PolypythiaError):
    """A dataset or tokenizer is missing or malformed."""


class CheckpointError(PolypythiaError):
    """A checkpoint is incomplete or corrupt."""


class DiskFullError(PolypythiaError):
    """The disk filled up while a checkpoint was written (polypythia.train.diskfull)."""


class TrackingError(PolypythiaError):
    """The tracking server cannot be started or reached."""


class DivergenceError(PolypythiaError):
    """Training produced a non-finite loss or stayed above the loss ceiling at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message, step)  # both in args, so the error pickles across Ray intact
        self.step = step

    def __str__(self) -> str:
        return self.args[0]


def exit_with(exc: PolypythiaError, code: int = 2) -> "NoReturn":
    """Print the error as one line and leave (SystemExit passes through Hydra's error handler)."""
    import sys

    print(f"polypythia: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def last_line(exc: BaseException) -> str:
    """An error from a Ray task in one line: its type and the last line of its text (Ray's text is
    the remote traceback, which ends with the cause)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
