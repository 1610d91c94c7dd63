"""``load_model``: an LDM from any of the folders the project reads (a model folder, an ``ldm-train`` run, the
MONAI bundle). Its own module, above ``model`` and ``bundle``, so neither imports the other back."""

from __future__ import annotations

from pathlib import Path

from common.errors import CheckpointError
from synth.ldm.bundle import is_bundle, load_bundle
from synth.ldm.model import LatentDiffusionModel, load_model_folder


def load_model(path: str | Path) -> LatentDiffusionModel:
    """An LDM from a model folder, a training run folder (its ``export/``), or a MONAI bundle folder."""
    path = Path(path).expanduser()
    if (path / "ldm.json").is_file():
        return load_model_folder(path)
    if (path / "export" / "ldm.json").is_file():
        return load_model_folder(path / "export")
    if is_bundle(path):
        return load_bundle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder")
    raise CheckpointError(
        f"{path}: not an LDM — expected ldm.json (a model folder), export/ldm.json (an ldm-train run) or "
        "configs/inference.json (the MONAI bundle brain_image_synthesis_latent_diffusion_model)"
    )
