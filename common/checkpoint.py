"""Encoder export/import as safetensors + JSON metadata, and strict state-dict loading (file writing and
reading: ``common.io``).

An export is one ``.safetensors`` file: the backbone's state dict plus, in the safetensors header under the
key ``neurotransfer``, a JSON object with ``arch`` (``model.arch``: the registry name and every constructor
argument, defaults included, that rebuild it), ``input_size``, ``spacing``, ``intensity`` (+ ``crop_foreground``,
``percentiles``: ``PreprocessConfig.describe``'s names) and free-form provenance (``corpus``, ``objective``,
``step``, ``manifest_hash`` …); ``package_version`` is added automatically. An export written before ``arch``
held the defaults still loads: ``create_backbone`` fills them in. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import common
from common import models
from common.errors import CheckpointError
from common.io import atomic_write

METADATA_KEY = "neurotransfer"
FOLDER_WEIGHTS = "model.safetensors"  # the weights of an export folder (``common.export``): an export file itself
# Keys every export must carry: what a fine-tune needs to feed the encoder the input it was trained on.
REQUIRED_METADATA = ("input_size", "spacing", "intensity")


# --------------------------------------------------------------------------------------------- strict loading
def check_finite(state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights that hold NaN or Inf (a run that diverged, a corrupt file): naming every such tensor.

    Loaded, they would only fail later and far away (an SVD in the probe, a NaN loss on the first step).
    """
    bad = []
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            inf = int(finite.numel() - finite.sum()) - nan
            counts = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
            bad.append(f"{key} ({counts} of {value.numel()})")
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold non-finite values — {shown}; these weights are corrupt "
            "(a run that diverged?): export them again from a checkpoint taken before the loss went NaN"
        )


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model``; missing/unexpected keys or shape mismatches raise ``CheckpointError``.

    All problems are listed at once, and nothing is loaded unless everything fits and is finite.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model — " + " | ".join(problems))
    check_finite(state, source)
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------ export
def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Size):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _model_arch(model: nn.Module) -> dict:
    arch = getattr(model, "arch", None)
    if not isinstance(arch, Mapping) or "name" not in arch:
        raise CheckpointError(
            f"cannot export a {type(model).__name__}: it has no `arch` dict "
            "({'name': ..., 'kwargs': {...}}); build backbones with common.models.create_backbone so they "
            "can be rebuilt from the export"
        )
    return {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}


def export_backbone(model: nn.Module, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` to the safetensors file ``path`` (atomically).

    ``metadata`` must hold ``input_size``, ``spacing`` and ``intensity`` (``input_size`` may be left out when
    the model has an ``img_size``); anything else JSON-serialisable is kept as provenance. ``arch`` is taken
    from ``model.arch`` and ``package_version`` from ``common.__version__``. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: an export must be a .safetensors file")
    meta = dict(metadata)
    arch = _model_arch(model)
    if "arch" in meta and _roundtrip(meta["arch"]) != _roundtrip(arch):
        raise CheckpointError(
            f"{path}: metadata['arch'] = {meta['arch']} disagrees with the model's own arch {arch}; leave it out"
        )
    meta["arch"] = arch
    if "input_size" not in meta and getattr(model, "img_size", None) is not None:
        meta["input_size"] = model.img_size
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise CheckpointError(
            f"{path}: export metadata lacks {', '.join(missing)}; pass them so a fine-tune can preprocess "
            "inputs the way the encoder was trained"
        )
    img_size = getattr(model, "img_size", None)
    if img_size is not None and _size3(meta["input_size"]) != _size3(img_size):
        raise CheckpointError(
            f"{path}: metadata input_size {meta['input_size']} differs from the model's img_size {img_size}; "
            "the export would describe inputs the model was not built for"
        )
    meta["package_version"] = common.__version__
    try:
        header = json.dumps(meta, default=_jsonable, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: export metadata is not JSON serialisable ({e})") from e

    # clone + contiguous: tied/shared tensors (and views) become independent, as safetensors requires.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={METADATA_KEY: header})
    return path


def _size3(size: Any) -> list[int]:
    return [int(size)] * 3 if isinstance(size, (int, np.integer)) else [int(s) for s in size]


def _roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_jsonable, sort_keys=True))


# ------------------------------------------------------------------------------------------------ import
def export_file(path: str | Path) -> Path:
    """The safetensors file of an export given as the file or as its folder (``FOLDER/model.safetensors``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / FOLDER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: a folder without {FOLDER_WEIGHTS}, so not an export folder")
    return path / FOLDER_WEIGHTS


def read_export_metadata(path: str | Path) -> dict:
    """The metadata dict of an export (file or folder), read from the safetensors header without the weights."""
    path = export_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such export file")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path}: a safetensors file without neurotransfer metadata, so not an export of "
            "common.checkpoint; import foreign weights through finetune's weight import instead"
        )
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the neurotransfer metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict) or "name" not in meta["arch"]:
        raise CheckpointError(f"{path}: the neurotransfer metadata has no arch {{'name', 'kwargs'}}")
    return meta


def read_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, metadata)`` of an export, for callers that adapt weights before loading them."""
    path = export_file(path)
    meta = read_export_metadata(path)
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the tensors ({e})") from e
    return state, meta


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the exported backbone with ``common.models.create_backbone`` and load its weights strictly."""
    state, meta = read_export(path, device="cpu")
    name = meta["arch"]["name"]
    try:
        model = models.create_backbone(name, **meta["arch"].get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild backbone {name!r} from the export's arch ({e})") from e
    load_state_dict_strict(model, state, path)
    return model.to(device), meta
