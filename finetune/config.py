"""Typed configs of a fine-tune run (one cell) and of a benchmark grid; loaded with ``common.config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.protocol import ProtocolConfig


@dataclass
class BackboneConfig:
    name: str = "resnet18"  # a name from common.models.list_backbones()
    kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # extra create_backbone kwargs (depth, patch_size ...)


@dataclass
class DataConfig:
    spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm; volumes are resampled to it
    shape: list[int] = field(default_factory=lambda: [64, 64, 64])  # model input (D, H, W) = img_size
    intensity: str = "zscore"  # common.data intensity mode: zscore | percentile | none
    crop_foreground: bool = True  # centre the brain's bounding box before pad/crop
    augment: bool = True  # light augmentation in full fine-tuning: L-R flip, intensity scale/shift
    num_workers: int = 2  # DataLoader workers that read and preprocess the NIfTI files once per run


@dataclass
class TrainConfig:
    mode: str = "full"  # "linear" (frozen backbone, cached features, scikit-learn probe) or "full"
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 8
    lr: float = 3e-4  # peak AdamW lr for the head; backbone layers get lr * layer_decay^(depth - layer)
    weight_decay: float = 0.05  # not applied to biases, norms, position embedding and cls token
    layer_decay: float = 0.75  # layer-wise lr decay for ViTs (1.0 = off); CNNs use one lr
    warmup_epochs: float = 2.0  # linear warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    patience: int = 8  # epochs without validation improvement before stopping
    class_weights: bool = True  # weight the loss by inverse class frequency of the training subjects
    head_norm: str = "batch"  # features standardised over the batch before the head ("batch") or not ("none")
    head_dropout: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    bf16: str = "auto"  # "auto" (bf16 autocast where the hardware has native bf16), "on", "off"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    probe_c: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # linear probe grid
    probe_alpha: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])  # ridge grid


@dataclass
class RunConfig:
    """One cell: a task on a manifest, a backbone with an init, one training fraction, one seed."""

    task: str = "ad"  # ad | pd | brain_age | classify:COLUMN | regress:COLUMN
    manifest: str = ""  # the task's manifest CSV
    init: str = "scratch"  # scratch, EXPORT.safetensors, or deepspeed:/timm2d:/videomae:/medicalnet:PATH
    init_axis: int = 0  # spatial axis a 2D init is inflated along (0 D, 1 H, 2 W)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    fraction: float = 1.0  # share of each fold's training subjects used (nested across fractions)
    seed: int = 0
    out_dir: str = ""  # the run directory (default runs/finetune/TASK-BACKBONE-INIT)
    bootstrap: int = 1000  # bootstrap resamples for the 95 % confidence intervals
    threshold: str = "youden"  # binary tasks' decision cut: "youden" (chosen on each fold's validation) | "argmax"
    cache_dir: str | None = None  # where linear-probe features are cached (default: OUT/cache)
    classical_pool: int = 2  # classical baseline on the inputs average-pooled by this factor per axis (0 = off)


@dataclass
class InitEntry:
    name: str = "scratch"  # the label in tables and plots
    spec: str = "scratch"  # the init spec given to common.weights.load_backbone
    backbones: list[str] = field(default_factory=list)  # backbone labels it applies to (empty: all)
    overrides: list[str] = field(
        default_factory=list
    )  # RunConfig key=value for this init, after the backbone's (train.layer_decay=0.75 for pre-trained weights)


@dataclass
class GridBackbone:
    label: str = "resnet18"  # the name in tables (two entries may share a registry name)
    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(
        default_factory=list
    )  # RunConfig key=value for this backbone (train.lr=1e-3)


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

