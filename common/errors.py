"""Exceptions the project raises for bad input; each message names the thing that was wrong."""

from __future__ import annotations

from pathlib import Path


class NeurotransferError(Exception):
    """Base class: an error the user can fix (bad input, bad config), shown without a traceback by the CLIs."""


class ConfigError(NeurotransferError, ValueError):
    """A configuration key or value is wrong."""


class DataError(NeurotransferError, ValueError):
    """A data file (image, manifest, video) is missing, unreadable or invalid."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)

    def __reduce__(self):
        # DataLoader workers pickle exceptions to the main process: rebuild from both arguments, not the message.
        return (type(self), (self.path, self.problem))


class CheckpointError(NeurotransferError, ValueError):
    """A checkpoint or weight file cannot be read or does not fit the model."""


class UsageError(NeurotransferError):
    """A command line the parser refused (argparse's message: an unknown option, a missing argument)."""


class TrainingDiverged(NeurotransferError):
    """Training cannot go on: the loss stayed NaN/Inf too many steps in a row, or features or outputs are NaN/Inf."""


USER_FACING = (NeurotransferError, OSError, KeyboardInterrupt)  # what a CLI ends on without a traceback


def end_of_command(e: BaseException, resume: str = "rerun the same command to resume") -> tuple[str, int]:
    """The one line a CLI prints for ``e`` (one of ``USER_FACING``) and its exit code: ``error: …`` and 2 for a
    mistake the user can fix or a file the system refused (``OSError`` names the file), ``interrupted; …`` and
    130 for Ctrl-C (``resume`` says how to go on: finished work is kept). A message of several lines is joined."""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted; {resume}", 130
    if isinstance(e, OSError) and not isinstance(e, NeurotransferError):
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}"
    else:
        message = str(e)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "error: " + (" ".join(lines) or type(e).__name__), 2
