"""Which architecture a cell fine-tunes: the config's (``model.backbone``, ``model.kwargs``) or, for an init that is
one of our exports, the export's own. Its ``config.json`` records every constructor argument, so ``--init FOLDER``
alone rebuilds it; a config that names another architecture is refused, naming both. The run's ``data.shape`` is
the model's input size (a ViT whose position grid it changes is refused by the load, unless ``allow_partial_init``).
"""

from __future__ import annotations

from typing import Any

from common.checkpoint import read_export_metadata
from common.errors import ConfigError
from common.models.registry import RUNTIME_ARGS, backbone_kwargs
from common.weights import parse_init

DEFAULT_BACKBONE = "resnet18"  # for an init that records no architecture (scratch, foreign weights)
INPUT_ARGS = ("img_size", "in_chans")  # set by the run's data (data.shape, one channel), not by the architecture


def export_arch(init: str) -> dict | None:
    """The ``arch`` an export init records (None for scratch and foreign weights)."""
    kind, path = parse_init(init)
    return read_export_metadata(path)["arch"] if kind == "export" else None


def resolve_arch(cfg) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of the backbone a cell builds (``kwargs`` without ``INPUT_ARGS``).

    With an export init: the export's name and every argument it records, an older export's unrecorded ones at
    the registry's defaults; ``model.backbone`` and ``model.kwargs`` may repeat them, or change ``RUNTIME_ARGS``
    (checkpointing, dropout ...), but a different value is a ``ConfigError`` naming both.
    """
    given = dict(cfg.model.kwargs)
    if set(given) & set(INPUT_ARGS):
        raise ConfigError(
            f"model.kwargs sets {sorted(set(given) & set(INPUT_ARGS))}: the input is data.shape with one channel; "
            "set data.shape instead"
        )
    arch = export_arch(cfg.init)
    if arch is None:
        return cfg.model.backbone or DEFAULT_BACKBONE, given
    name, source = arch["name"], parse_init(cfg.init)[1]
    fix = "leave it out to fine-tune the export's architecture, or choose another init"
    if cfg.model.backbone and cfg.model.backbone != name:
        raise ConfigError(
            f"model.backbone {cfg.model.backbone!r} (--backbone) differs from the init's: {source} is a {name!r}; {fix}"
        )
    recorded = backbone_kwargs(name, **arch.get("kwargs", {}))
    asked = backbone_kwargs(name, **given)
    differ = [
        f"{k}={asked[k]!r} (the export's {k}={recorded[k]!r})"
        for k in given
        if k in recorded and k not in RUNTIME_ARGS and k not in INPUT_ARGS and asked[k] != recorded[k]
    ]
    if differ:
        raise ConfigError(f"model.kwargs differ from the init's architecture ({source}): {'; '.join(differ)}; {fix}")
    return name, {k: v for k, v in {**recorded, **given}.items() if k not in INPUT_ARGS}
