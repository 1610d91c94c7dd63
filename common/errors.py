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
