"""An encoder export as a folder, the layout ``huggingface_hub`` and timm share: ``model.safetensors`` (our
single-file export, metadata in its header), ``config.json`` (architecture, preprocessing, provenance) and a
generated ``README.md`` model card.

``common.checkpoint.load_export(FOLDER)`` and ``common.weights.load_backbone(model, "FOLDER")`` read it; the
weights file alone stays a complete export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from common.checkpoint import FOLDER_WEIGHTS, export_backbone, read_export_metadata
from common.errors import CheckpointError
from common.io import atomic_write

CONFIG = "config.json"
CARD = "README.md"
ORIENTATION = "RAS"  # every volume is reoriented to RAS+ before a model sees it (docs/ARCHITECTURE.md)
# How the card names what pretrain's config calls them (pretrain/objectives, pretrain/corpora); others verbatim.
OBJECTIVES = {
    "mae": "masked autoencoding (MAE)",
    "simclr": "SimCLR",
    "moco": "MoCo v3",
    "yaware": "y-aware contrastive learning (age kernel)",
}
CORPORA = {
    "synthmri": "synthetic brain MRI (synth/, generated on the fly)",
    "medical": "medical NIfTI volumes",
    "video": "natural video",
    "mixed": "a mix of synthetic MRI, medical volumes and video",
}


def export_folder(
    model: nn.Module, folder: str | Path, metadata: Mapping[str, Any], metrics: str | Path | None = None
) -> Path:
    """Write ``folder/{model.safetensors, config.json, README.md}``, each file atomically, weights first.

    ``metadata`` is ``export_backbone``'s (``spacing``, ``intensity`` required; ``corpus``, ``objective``,
    ``step``, ``steps`` ... kept); ``metrics`` a ``metrics.jsonl`` whose loss curve the card summarises.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; an export folder cannot be written there")
    meta = {"orientation": ORIENTATION, **metadata}
    weights = export_backbone(model, folder / FOLDER_WEIGHTS, meta)
    config = folder_config(read_export_metadata(weights))
    curve = loss_summary(metrics) if metrics is not None else None
    if curve:
        config["training"] = curve
    with atomic_write(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    with atomic_write(folder / CARD) as tmp:
        tmp.write_text(model_card(config, folder.as_posix()))
    return folder


def link_file(src: str | Path, dst: str | Path) -> Path:
    """``dst`` as a second name of ``src``'s bytes (a hard link; a copy where links are not possible), replaced
    atomically: an export folder's weights under the single-file name older readers open."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".tmp-link-{dst.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    return dst


def folder_config(meta: Mapping[str, Any]) -> dict:
    """``config.json``: the export metadata with the preprocessing a user must reproduce gathered in one place."""
    kwargs = meta["arch"].get("kwargs", {})
    size = meta.get("input_size", kwargs.get("img_size"))
    size = [size] * 3 if isinstance(size, int) else list(size)
    provenance = {
        k: v for k, v in meta.items() if k not in ("arch", "input_size", "spacing", "intensity", "orientation")
    }
    return {
        "format": "neurotransfer-export",
        "weights": FOLDER_WEIGHTS,
        "arch": meta["arch"],
        "input_size": size,
        "preprocessing": {
            "orientation": meta.get("orientation", ORIENTATION),
            "spacing": meta["spacing"],
            "shape": size,
            "intensity": meta["intensity"],
            "channels": kwargs.get("in_chans", 1),
            "layout": "(B, C, D, H, W) float32, D/H/W the NIfTI i/j/k axes after reorientation",
        },
        **provenance,
    }


def loss_summary(metrics: str | Path) -> dict | None:
    """First, lowest and last training loss of a ``metrics.jsonl`` (None when it has no loss)."""
    path = Path(metrics)
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
            rows.append(row)
    if not rows:
        return None
    best = min(rows, key=lambda r: r["loss"])
    tail = rows[-max(1, len(rows) // 10) :]  # the last tenth of the logged steps: less noisy than one step
    return {
        "logged_steps": len(rows),
        "first": {"step": rows[0]["step"], "loss": rows[0]["loss"]},
        "lowest": {"step": best["step"], "loss": best["loss"]},
        "last": {"step": rows[-1]["step"], "loss": rows[-1]["loss"]},
        "last_tenth_mean": sum(r["loss"] for r in tail) / len(tail),
    }


def model_card(config: Mapping[str, Any], where: str = "export") -> str:
    """The ``README.md`` of an export folder, written from its ``config.json``; ``where`` is the folder's path
    as the load examples give it."""
    arch, pre = config["arch"], config["preprocessing"]
    corpus, objective = config.get("corpus", "unrecorded"), config.get("objective", "unrecorded")
    step, steps = config.get("step"), config.get("steps")
    trained = f"{step} optimizer steps" + (f" of {steps} planned" if steps and steps != step else "")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in arch.get("kwargs", {}).items())
    lines = [
        f"# {arch['name']} encoder for 3D brain MRI ({objective}, {corpus})",
        "",
        f"A `{arch['name']}` backbone pre-trained with **{OBJECTIVES.get(objective, objective)}** on "
        f"**{CORPORA.get(corpus, corpus)}** (corpus `{corpus}`) for "
        + (trained if step is not None else "an unrecorded number of steps")
        + f", exported by neurotransfer {config.get('package_version', '?')}. It is the encoder only: "
        "no task head, to be fine-tuned or probed.",
        "",
        "## Load it",
        "",
        "```python",
        "from common.checkpoint import load_export",
        "",
        f'model, meta = load_export("{where}")  # the rebuilt backbone with these weights, and its metadata',
        "```",
        "",
        f"or give the folder as the init of a fine-tune (`python -m finetune run --init {where} ...`) or to "
        f'`common.weights.load_backbone(model, "{where}")`. The architecture is '
        f'`create_backbone("{arch["name"]}", {kwargs})`.',
        "",
        "## Preprocessing it expects",
        "",
        "| step | value |",
        "|---|---|",
        f"| orientation | {pre['orientation']}+ (reorient before anything else) |",
        f"| spacing | {_mm(pre['spacing'])} mm |",
        f"| shape | {' × '.join(map(str, pre['shape']))} voxels (D × H × W), pad or crop after resampling |",
        f"| intensity | `{pre['intensity']}` (`common.data.PreprocessConfig.intensity`) |",
        f"| input | {pre['channels']} channel{'s' if pre['channels'] != 1 else ''}, {pre['layout']} |",
        "",
        "`common.data.load_volume(path, PreprocessConfig(spacing, shape, intensity))` does all of it.",
        "",
        "## Training",
        "",
    ]
    curve = config.get("training")
    if curve:
        lines += [
            f"Training loss ({objective}) over {curve['logged_steps']} logged steps: "
            f"{curve['first']['loss']:.4g} at step {curve['first']['step']}, lowest {curve['lowest']['loss']:.4g} "
            f"at step {curve['lowest']['step']}, {curve['last']['loss']:.4g} at the last logged step "
            f"{curve['last']['step']} (mean of the last tenth {curve['last_tenth_mean']:.4g}).",
        ]
    else:
        lines.append("No metrics.jsonl was given with this export, so no loss curve is summarised here.")
    shown = ("corpus", "objective", "precision", "step", "steps", "manifest_hash", "package_version")
    provenance = {k: v for k, v in config.items() if k in shown and v is not None}
    lines += ["", "Provenance: " + ", ".join(f"{k} `{v}`" for k, v in provenance.items()) + "."]
    lines += [
        "",
        "## Limits",
        "",
        "An encoder pre-trained on this corpus alone; whether it helps a task is measured by fine-tuning "
        "(`python -m finetune benchmark`), not by its pre-training loss. `config.json` holds everything above "
        "in machine-readable form.",
        "",
    ]
    return "\n".join(lines)


def _mm(spacing: Any) -> str:
    values = [spacing] * 3 if isinstance(spacing, (int, float)) else list(spacing)
    return " × ".join(f"{v:g}" for v in values)
