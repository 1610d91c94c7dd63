"""DeepSpeed's checkpoint files, read safely: the one module outside ``pretrain.engine`` that imports DeepSpeed.

``pretrain.engine`` saves and restores training checkpoints through DeepSpeed, which unpickles in full; a
fine-tune reads one as a ``deepspeed:DIR`` init (``common.weights``), and ``finetune`` may not import
``pretrain``. Both go through here: ``check_tag`` reads every file of a checkpoint with ``weights_only`` before
DeepSpeed opens it, and ``read_module_state`` gives the weights (ZeRO shards consolidated by DeepSpeed's
``zero_to_fp32``). DeepSpeed is imported inside the functions: it is slow to import and only its checkpoints
need it.

Layout: ``FOLDER/latest`` names a tag; ``FOLDER/TAG/*model_states.pt`` (``mp_rank_00_model_states.pt``) and,
for ZeRO 1-3, ``FOLDER/TAG/*optim_states.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError
from common.io import load_torch_file

MODEL_STATES = "mp_rank_00_model_states.pt"  # the module's weights (ZeRO 0) and the run's records


def _plain_types() -> list[Any]:
    """The non-tensor types DeepSpeed's own checkpoints hold (ZeRO 1-3 optimizer states): plain records that
    run no code when built."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def is_tag(path: str | Path) -> bool:
    """Whether ``path`` is one checkpoint (a tag folder holding model states), not the folder of several."""
    path = Path(path)
    return path.is_dir() and any(path.glob("*model_states.pt"))


def check_tag(tag_dir: str | Path) -> None:
    """Refuse a tag folder if any of its ``.pt`` files needs code to unpickle.

    DeepSpeed reads its checkpoints with full pickle (``weights_only=False``), so before it opens them each
    file is read here with ``weights_only=True``, allowing only DeepSpeed's own plain types; a file that
    would build anything else raises a ``CheckpointError`` naming it, and DeepSpeed never sees it.
    """
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed checkpoint files (*.pt) in this folder")
    allow = _plain_types()
    hint = "A DeepSpeed checkpoint written by DeepSpeed holds only tensors and plain DeepSpeed records."
    for path in files:
        load_torch_file(path, "cpu", allow, hint)


def tag_folder(path: str | Path) -> Path:
    """The checkpoint ``path`` means: the tag its ``latest`` file names, or ``path`` itself as a tag folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint folder, nor a folder at all")
    tag_dir = path
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not tag or Path(tag).name != tag:
            raise CheckpointError(f"{path}/latest: names {tag!r}, not a tag folder inside {path}")
        tag_dir = path / tag
    if not is_tag(tag_dir):
        raise CheckpointError(
            f"{path}: no DeepSpeed model states ({MODEL_STATES}) in {tag_dir}; point at the "
            "checkpoints folder (with `latest`) or at one tag folder"
        )
    return tag_dir


def read_module_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the checkpoint ``path`` (``tag_folder``), keyed as the engine's module, every file
    checked first (``check_tag``). ZeRO shards are consolidated by DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint``; without them (ZeRO 0) the model states are read directly."""
    tag_dir = tag_folder(path)
    check_tag(tag_dir)  # DeepSpeed's own readers unpickle in full: refuse files that need code
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    obj = load_torch_file(tag_dir / MODEL_STATES)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("module"), Mapping):
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: no 'module' state dict inside")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj["module"].items()}
