"""Weight import: one entry point, ``load_backbone(model, init)``, for every pre-training source.

Init specs:
  ``scratch``            keep the model as built (nothing loaded; the report says so)
  ``PATH.safetensors``   our own export (``common.checkpoint.export_backbone``)
  ``FOLDER``             our export folder (``common.export``: model.safetensors, config.json, README.md)
  ``deepspeed:DIR``      a DeepSpeed checkpoint folder; ZeRO shards consolidated by DeepSpeed's zero_to_fp32
  ``timm2d:PATH``        ImageNet ViT / ResNet in timm's format, inflated to 3D (I3D)
  ``videomae:PATH``      VideoMAE, original repository or Hugging Face transformers format
  ``medicalnet:PATH``    MedicalNet 3D ResNet into MONAI's ResNet
  ``monai:PATH``         MONAI ViT / MaskedAutoEncoderViT (BrainIAC ...), plain or Lightning-wrapped

Readers (one per format, ``common.weights.sources.READERS``) rename keys; ``common.weights.fit`` adapts shapes
with the pure functions in ``common.weights.adapt``; the load itself is one ``load_state_dict`` of
tensors that all fit. An init that loads nothing raises ``CheckpointError``; missing and unexpected keys
are in the report.

Our own weights (an export, a DeepSpeed checkpoint: ``OWN_KINDS``) were trained in a backbone of this registry,
so they must fit the model exactly: a tensor left as initialised or resized means the model is not the one they
were trained in, and is refused unless ``allow_partial``. Foreign weights are adapted by design (a 2D kernel
inflated, a tubelet or position grid resampled, VideoMAE's fixed sin-cos table absent): the report lists it all.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from common.checkpoint import check_finite, export_file
from common.errors import CheckpointError
from common.weights.fit import fit_state
from common.weights.report import LoadReport, shortened
from common.weights.sources import READERS, read_own_export

__all__ = ["LoadReport", "load_backbone", "parse_init", "INIT_KINDS", "OWN_KINDS"]

log = logging.getLogger(__name__)

INIT_KINDS = ("scratch", "export", *READERS)
OWN_KINDS = ("export", "deepspeed")  # weights this project trained: they fit a model of its registry exactly


def parse_init(init: str) -> tuple[str, Path | None]:
    """``"timm2d:/w.pth"`` -> ``("timm2d", Path("/w.pth"))``; ``"scratch"`` -> ``("scratch", None)``;
    a bare path -> ``("export", path)``."""
    init = str(init).strip()
    if init in ("scratch", "none", ""):
        return "scratch", None
    kind, sep, rest = init.partition(":")
    if sep and kind in READERS:
        if not rest:
            raise CheckpointError(f"init {init!r}: {kind}: needs a path after the colon")
        return kind, Path(rest).expanduser()
    if sep and len(kind) > 1 and "/" not in kind and not Path(init).exists():
        raise CheckpointError(
            f"init {init!r}: unknown weight source {kind!r}; use scratch, a .safetensors export, or one of "
            + ", ".join(f"{k}:PATH" for k in READERS)
        )
    return "export", Path(init).expanduser()


def load_backbone(model: nn.Module, init: str, axis: int = 0, allow_partial: bool = False) -> LoadReport:
    """Load the weights named by ``init`` into ``model`` (in place) and return what was done, key by key.

    Args:
        model: a backbone from ``common.models.create_backbone`` (ViT3D or a MONAI CNN wrapper).
        init: the init spec (see the module docstring).
        axis: the spatial axis (0 D, 1 H, 2 W) 2D kernels are inflated along / a video's time axis maps to.
        allow_partial: load our own weights (``OWN_KINDS``) into a model they do not fit exactly, leaving
            tensors as initialised and resizing others (the report lists them).

    Raises ``CheckpointError`` for a file of the wrong kind, tensors that cannot be fitted or hold NaN/Inf, a
    source that fills no parameter of the model, or our own weights that do not fit it exactly (unless
    ``allow_partial``). Nothing is loaded when it raises.
    """
    kind, path = parse_init(init)
    if kind == "scratch":
        return LoadReport(init=str(init))
    if axis not in (0, 1, 2):
        raise CheckpointError(f"init {init!r}: axis must be 0 (D), 1 (H) or 2 (W), got {axis}")
    reader = read_own_export if kind == "export" else READERS[kind]
    if kind == "export":
        path = export_file(path)  # an export folder -> its model.safetensors
    report = LoadReport(init=str(init), source=str(path))
    state, layout = reader(path, model, axis)
    tensors = fit_state(state, model, layout, report)
    if not tensors:
        raise CheckpointError(
            f"{path}: init {init!r} fills no parameter of the {type(model).__name__} "
            f"(source keys: {', '.join(list(state)[:8])}); check the backbone and the init kind"
        )
    if kind in OWN_KINDS and not allow_partial and (report.missing or report.resized):
        raise CheckpointError(f"{path}: {_partial(report, model)}")
    check_finite({k: state[k] for k in tensors}, path)  # as in the file (before inflation), under the model's names
    model.load_state_dict(tensors, strict=False)
    log.info(report.summary())
    if report.missing:
        log.warning(
            "init %s left %d model tensors as initialised: %s",
            init,
            len(report.missing),
            ", ".join(report.missing),
        )
    return report


def _partial(report: LoadReport, model: nn.Module) -> str:
    """Why our own weights are refused: what they would leave as initialised or resize, and the two ways on."""
    found = []
    if report.missing:
        found.append(f"leave {len(report.missing)} tensor(s) as initialised ({shortened(report.missing)})")
    if report.resized:
        found.append(f"resize {len(report.resized)} ({shortened([f'{k} {v}' for k, v in report.resized.items()])})")
    return (
        f"loading these weights would {' and '.join(found)} of the {type(model).__name__}: it is not the model they "
        "were trained in. Build that model (finetune: leave --backbone and model.kwargs out to take the export's, "
        "and set data.shape to its input size), or load them partially on purpose (finetune: --allow-partial, or "
        "allow_partial_init: true)"
    )
