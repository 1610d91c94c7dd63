"""A weight file read as name -> tensor (``.safetensors``, or ``.pt``/``.pth``/``.bin`` with ``weights_only``),
unwrapped from the usual containers: what every source reader starts from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.errors import CheckpointError
from common.io import load_torch_file

State = dict[str, torch.Tensor]

# Containers checkpoints are commonly wrapped in ({"model": sd}, {"state_dict": sd}, {"module": sd}).
_WRAPPERS = ("state_dict", "model", "module", "model_state", "encoder")


def read_tensor_file(path: Path) -> State:
    """Name -> tensor from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (weights_only), unwrapped."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weight file (.safetensors, .pth, .pt, .bin)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if head not in (b"PK", b"\x80\x02") and not head.startswith(b"\x80"):  # torch zip, or legacy pickle
            kind = "a gzip file (a NIfTI image?)" if head == b"\x1f\x8b" else f"a file starting with {head!r}"
            raise CheckpointError(f"{path}: {kind}, not a weight file (.safetensors, or .pt/.pth/.bin from torch.save)")
        obj = load_torch_file(path)
    for _ in range(3):  # nested wrappers, e.g. {"model": {"module": sd}}
        if isinstance(obj, Mapping) and not _is_state(obj):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state(obj):
        raise CheckpointError(f"{path}: holds no state dict of tensors (top-level keys: {keys_of(obj)})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def keys_of(obj: object) -> str:
    """The first top-level keys of ``obj`` (or its type), for error messages."""
    return ", ".join(list(map(str, obj))[:8]) if isinstance(obj, Mapping) else type(obj).__name__
