"""When a pre-training run may write into its run folder: a fresh run never writes over checkpoints, ``--resume
auto`` continues the latest one, and a resumed run keeps the settings that shaped its model and data. Every
refusal comes before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import config_values, load_config
from common.deepspeed_checkpoint import is_tag
from common.errors import CheckpointError, ConfigError
from pretrain.config import PretrainConfig

# Settings a resumed run may not change: they decide the model's shapes or the data it has been trained on.
# (Loader knobs, logging, the step budget and the optimizer may change on resume.)
RESUME_FIXED = ("corpus", "model.backbone", "model.kwargs", "objective", "data")
RESUME_FREE = ("data.num_workers", "data.prefetch_factor", "data.max_bad_share", "data.min_items_for_bad_share")


def resume_point(cfg, out: Path, resume: str | None) -> tuple[Path, str | None] | None:
    """(checkpoint folder, tag or None for ``latest``) that the run in ``out`` continues from, or None for a
    fresh run; refuses an ``out`` that is a file and a resume whose settings differ from the run's own."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out is a file, not a run folder; choose a folder path")
    found = _find_resume(out, resume)
    if found is not None:
        _check_resume_config(cfg, found[0].parent / "config.yaml")
    return found


def _find_resume(out: Path, resume: str | None) -> tuple[Path, str | None] | None:
    """(checkpoint folder, tag or None for ``latest``) to resume from, or None for a fresh run."""
    ckpt = out / "checkpoints"
    if resume is None:
        if (ckpt / "latest").is_file():
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume auto to continue that run, or choose another --out"
            )
        return None
    if resume == "auto":
        return (ckpt, None) if (ckpt / "latest").is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, None
    if is_tag(path):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file) nor a checkpoint tag")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _check_resume_config(cfg, saved: Path) -> None:
    """Refuse a resume whose architecture or data settings differ from the run's saved ``config.yaml``,
    naming the keys, before anything is written. The saved file is read through the schema, as a run's own
    config is: a key renamed since it was written reads as the new key, and a field added since as its default."""
    if not saved.is_file():
        return
    try:
        old = _flat(config_values(load_config(PretrainConfig, saved)))
    except ConfigError as e:  # a YAML error, a file that is no mapping, a key no version had
        raise ConfigError(f"{saved}: cannot read the run's saved config ({e})") from None
    new = _flat(config_values(cfg))
    fixed = lambda k: k.startswith(RESUME_FIXED) and not k.startswith(RESUME_FREE)
    differ = sorted(k for k in set(old) | set(new) if fixed(k) and old.get(k) != new.get(k))
    if differ:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{saved}: the run being resumed was trained with other settings ({changes}); resume with the "
            "same settings, or start a new run in another --out"
        )
