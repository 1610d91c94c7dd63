"""Resumable training state of one LDM stage: a ``.pt`` file of tensors and plain values, saved atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.io import atomic_write, load_torch_file


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of state dicts, step and numbers (readable with ``weights_only=True``), atomically."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when the stage has not checkpointed yet."""
    return load_torch_file(path) if path.is_file() else None


def log_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
