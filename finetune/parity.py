"""Preprocessing parity between a pre-trained export and the fine-tuning run that loads it.

An export records how its pre-training corpus was fed to the model (``spacing``, ``intensity``, ``input_size``;
``pretrain.provenance.export_metadata``). A fine-tune that feeds the encoder differently (4 mm volumes to an encoder
trained on 2 mm, z-scores to one trained on [0, 1]) asks it for features of inputs it never saw; the run still
works, so the mismatch is reported, not refused: each one is logged as a warning and kept in ``metrics.json``.
"""

from __future__ import annotations

import logging

from common.checkpoint import read_export_metadata
from common.weights import parse_init
from finetune.config import DataConfig

log = logging.getLogger(__name__)


def _per_axis(value) -> list:
    """A recorded value as (D, H, W): exports may record one number for all three axes (``export_backbone`` and
    ``load_backbone`` accept both)."""
    return [value] * 3 if isinstance(value, (int, float)) else list(value)


def preprocessing_mismatches(meta: dict, data: DataConfig) -> list[str]:
    """What differs between the export's recorded preprocessing ``meta`` and the run's ``data``, in words."""
    found = []
    spacing = meta.get("spacing")
    spacing = None if spacing is None else _per_axis(spacing)
    if spacing is not None and [round(float(s), 3) for s in spacing] != [round(float(s), 3) for s in data.spacing]:
        found.append(f"spacing: pre-trained at {list(spacing)} mm, fine-tuned at {list(data.spacing)} mm")
    intensity = meta.get("intensity")
    if intensity not in (None, "mixed") and intensity != data.intensity:
        found.append(
            f"intensity: pre-trained on {intensity!r} inputs, fine-tuned on {data.intensity!r} (data.intensity)"
        )
    size = meta.get("input_size")
    size = None if size is None else _per_axis(size)
    if size is not None and list(map(int, size)) != list(map(int, data.shape)):
        found.append(
            f"input size: pre-trained on {list(size)}, fine-tuned on {list(data.shape)} "
            "(a ViT's position embedding is resampled)"
        )
    return found


def check_parity(init: str, data: DataConfig) -> list[str]:
    """Warn about every preprocessing mismatch between the export ``init`` names and ``data``; returns them.
    Scratch and foreign weight files (timm, VideoMAE, MedicalNet) record no preprocessing: nothing to compare."""
    kind, path = parse_init(init)
    if kind != "export" or path is None:
        return []
    found = preprocessing_mismatches(read_export_metadata(path), data)
    for line in found:
        log.warning("%s: preprocessing differs from pre-training, %s", path, line)
    return found
