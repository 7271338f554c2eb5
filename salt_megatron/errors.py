"""The errors a user can cause (bad flags, files, checkpoints), as exception types.

Library code raises these (never ``SystemExit``); the command line (``salt_megatron.cli``) turns any of them, and
the few library failures it knows (an ``OSError`` naming a file), into one line on stderr and exit code 2.  Each
message names the file or flag at fault and, where there is one, the fix.  Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse


class SaltError(Exception):
    """A problem with the user's input: printed as one line by the CLI (exit code 2)."""


class UsageError(SaltError):
    """Flags that are malformed, contradict each other or do not fit the machine."""


class DataError(SaltError, ValueError):
    """A dataset, tokenizer, text input or score sidecar that is missing, malformed or does not fit the run."""


class MissingFile(SaltError, FileNotFoundError):
    """An input file or directory the user named (or that a default points at) is not there."""


class CheckpointError(SaltError, RuntimeError):
    """A checkpoint that is missing, incomplete, damaged, foreign, or does not fit the run."""


class TeacherRefused(SaltError):
    """The teacher cannot be used with this student: the message says why and what to do."""


class ResumeMismatch(CheckpointError):
    """A resume whose flags differ from what the checkpoint recorded, without the override for that group."""


class TrainingDiverged(SaltError, RuntimeError):
    """A NaN/Inf loss or gradient: the run stops before saving it (``--check-for-nan-in-loss-and-grad``)."""


def one_line(message: str) -> str:
    """``message`` on one line (a library message can hold line breaks)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are exceptions (:class:`UsageError`), so every command reports them the same way."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def require_modules(extra: str, *modules: str) -> None:
    """One line naming the pip extra to install when an optional module a command needs is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"this needs {', '.join(missing)}: pip install 'salt_megatron[{extra}]'")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into its one-line usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
