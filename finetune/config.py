"""Typed configs of a fine-tune run (one cell) and of a benchmark grid; loaded with ``common.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from common.precision import DEVICES, PRECISIONS
from finetune.protocol import SCHEMES, ProtocolConfig

TRAIN_MODES = ("linear", "full", "lora")  # finetune.modes.MODES implements each
HEAD_NORMS = ("batch", "none")  # features standardised over the batch before the head, or not
HEAD_INITS = ("random", "probe", "choose")  # full / LoRA: a random head, the probe's (LP-FT), or the better one
THRESHOLDS = ("youden", "argmax")  # a binary task's decision cut
MISSING = ("drop", "error")  # a row whose label or covariate cell is empty: left out and counted, or refused


@dataclass
class ModelConfig:
    backbone: str | None = None  # a name from common.models.list_backbones(); null: an export init's (else resnet18)
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_backbone kwargs; an export init's fill the rest


@dataclass
class OptimConfig:
    """AdamW and its schedule (the same keys as pretrain's ``optim``; warm-up counts epochs here, not steps)."""

    lr: float = 3e-4  # peak AdamW lr for the head; backbone layers get lr * layer_decay^(depth - layer)
    weight_decay: float = 0.05  # not applied to biases, norms, position embedding and cls token
    layer_decay: float = 0.75  # layer-wise lr decay for ViTs (1.0 = off); CNNs use one lr
    warmup_epochs: float = 2.0  # linear warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max gradient norm (0 = off)


@dataclass
class DataConfig:
    spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm; volumes are resampled to it
    shape: list[int] = field(default_factory=lambda: [64, 64, 64])  # model input (D, H, W) = img_size
    intensity: str = "zscore"  # common.data intensity mode: zscore | percentile | none
    crop_foreground: bool = True  # centre the brain's bounding box before pad/crop
    augment: bool = True  # light augmentation in full fine-tuning: L-R flip, intensity scale/shift
    num_workers: int = 2  # DataLoader workers that read and preprocess the NIfTI files once per run


@dataclass
class LoraSettings:
    """LoRA through ``peft`` (``train.mode=lora``): low-rank updates on the backbone's projections."""

    rank: int = 4  # r of each update B·A; ~3 % of a ViT-Ti backbone trains at r 4 (adapters + norms)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA branch's input
    targets: list[str] = field(default_factory=list)  # module suffixes (attn.qkv) or a type (Conv3d); []: default


def _l2_of_c(cs: Any) -> Any:
    """An old ``train.probe_c`` (logistic regression's C grid) as the L2 penalties it meant, λ = 1/C ascending; a
    value that is not a list of positive numbers is passed on for the schema and ``validate`` to refuse."""
    if isinstance(cs, list) and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in cs):
        return sorted(1 / c for c in cs)
    return cs


@dataclass
class TrainConfig:
    # saved runs' probe grids (common.config reads them as probe_l2): ridge's alpha is λ, logistic regression's C 1/λ
    __renamed__ = {"probe_alpha": "probe_l2", "probe_c": ("probe_l2", _l2_of_c)}

    mode: str = "full"  # TRAIN_MODES: linear (frozen backbone, cached features, scikit-learn probe) | full | lora
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 8
    seed: int = 0  # folds, the training subsets, a scratch backbone's weights and the bootstrap derive from it
    patience: int = 8  # epochs without validation improvement before stopping
    class_weights: bool = True  # weight the loss by inverse class frequency of the training subjects
    head_norm: str = "batch"  # HEAD_NORMS: features standardised over the batch before the head, or not
    head_dropout: float = 0.0
    # HEAD_INITS: probe = the head starts as a linear probe of the frozen initial features, its strength chosen on
    # the validation subjects (LP-FT, Kumar et al. 2022: a random head's first gradients distort pre-trained
    # features, and few labels give it few steps to catch up); choose = each fold trained from both starts, the
    # one with the better best validation score kept (twice the training time)
    head_init: str = "random"
    precision: str = "auto"  # auto (bf16 where the hardware computes bf16 natively) | bf16 | fp32
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    # L2 penalties λ of the linear probe (mode linear, LP-FT's head, `probe`): ridge alpha = λ, logistic C = 1/λ
    probe_l2: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])
    lora: LoraSettings = field(default_factory=LoraSettings)  # used by mode lora only


@dataclass
class RunConfig:
    """One cell: a task on a manifest, a backbone with an init, one training fraction, one seed."""

    # keys of runs saved before pretrain and finetune spoke one vocabulary (common.config reads them as the new)
    __renamed__ = {
        "backbone.name": "model.backbone",
        "backbone.kwargs": "model.kwargs",
        "seed": "train.seed",
        **{f"train.{k}": f"optim.{k}" for k in OptimConfig.__dataclass_fields__},
    }

    task: str = "ad"  # ad | pd | brain_age | classify:COLUMN | regress:COLUMN
    manifest: str = ""  # the task's manifest CSV
    init: str = "scratch"  # scratch, an export (folder or .safetensors), or KIND:PATH (common.weights.INIT_KINDS)
    init_axis: int = 0  # spatial axis a 2D init is inflated along (0 D, 1 H, 2 W)
    allow_partial_init: bool = False  # load our own weights into a model they do not fit (tensors left or resized)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    fraction: float = 1.0  # share of each fold's training subjects used (nested across fractions)
    out_dir: str = ""  # the run directory (default runs/finetune/TASK-BACKBONE-INIT)
    bootstrap: int = 1000  # bootstrap resamples for the 95 % confidence intervals
    threshold: str = "youden"  # binary tasks' decision cut: youden (chosen on each fold's validation) | argmax
    cache_dir: str | None = None  # where linear-probe features are cached (default: OUT/cache)
    drop_labels: list[str] = field(default_factory=list)  # labels to leave out (e.g. [MCI]); other unknowns: error
    missing: str = "drop"  # MISSING: rows with an empty label (or probed covariate) are left out and counted | error
    classical_pool: int = 2  # classical baseline on the inputs average-pooled by this factor per axis (0 = off)


@dataclass
class InitEntry:
    name: str = "scratch"  # the label in tables and plots
    spec: str = "scratch"  # the init spec given to common.weights.load_backbone
    backbones: list[str] = field(default_factory=list)  # backbone labels it applies to (empty: all)
    overrides: list[str] = field(default_factory=list)  # RunConfig key=value after the backbone's (layer_decay)


@dataclass
class GridBackbone:
    label: str = "resnet18"  # the name in tables (two entries may share a registry name)
    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # RunConfig key=value for this backbone (optim.lr=1e-3)


@dataclass
class GridConfig:
    """Backbones × inits × tasks × fractions × seeds; every cell a ``RunConfig`` built from ``base``."""

    out_dir: str = "runs/finetune_grid"  # where cells, results and plots go (the CLI's --out overrides it)
    tasks: dict[str, str] = field(default_factory=dict)  # task -> manifest CSV
    backbones: list[GridBackbone] = field(default_factory=lambda: [GridBackbone()])
    inits: list[InitEntry] = field(default_factory=lambda: [InitEntry()])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    base: RunConfig = field(default_factory=RunConfig)  # everything else (data, train, protocol ...)
    metrics: list[str] = field(default_factory=list)  # columns of results.md beyond the primary (default set)
    min_test_subjects: int = 20  # a paired gain on fewer test subjects per seed gets no verdict (too_few)


def validate(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` naming the first field of one cell's config with a value the run cannot use."""
    choices = {
        "train.mode": (cfg.train.mode, TRAIN_MODES),
        "train.head_norm": (cfg.train.head_norm, HEAD_NORMS),
        "train.head_init": (cfg.train.head_init, HEAD_INITS),
        "train.precision": (cfg.train.precision, PRECISIONS),
        "threshold": (cfg.threshold, THRESHOLDS),
        "missing": (cfg.missing, MISSING),
        "protocol.scheme": (cfg.protocol.scheme, SCHEMES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    l2 = cfg.train.probe_l2
    if not l2 or not all(0 < v < float("inf") for v in l2):
        raise ConfigError(f"train.probe_l2 must be a non-empty list of positive finite L2 penalties, got {list(l2)}")
    if cfg.train.device not in DEVICES and not cfg.train.device.startswith("cuda:"):
        raise ConfigError(f"train.device must be one of {DEVICES} (or cuda:N), got {cfg.train.device!r}")
    if not cfg.manifest:
        raise ConfigError("manifest is not set; pass --manifest PATH (a CSV with path, subject_id and the label)")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(
            f"fraction must lie in (0, 1] (the share of each fold's training subjects), got {cfg.fraction}"
        )
