"""The pre-training config schema: typed dataclasses, one comment per field saying why it exists.

Values are merged as these defaults ⊕ a YAML recipe (``configs/pretrain/``) ⊕ ``key=value`` overrides by
``common.config.load_config``; a wrong key or type is a ``ConfigError`` naming it. DeepSpeed's own settings
(ZeRO stage, communication) live in the DeepSpeed JSON; what a recipe decides (batch, lr, precision) lives
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.attention import BACKENDS
from common.errors import ConfigError
from common.precision import DEVICES, PRECISIONS
from pretrain.corpora import CORPORA
from pretrain.corpora.video import VIDEO_READERS
from pretrain.objectives import OBJECTIVES
from pretrain.objectives.mae import MASKINGS
from pretrain.views import VIEWS, rescan_views


@dataclass
class SynthMRIConfig:
    directory: str | None = None  # a directory written by `python -m synth`; None generates volumes on the fly
    synth_config: str | None = None  # YAML for synth's generator (on the fly); None uses synth's defaults
    overrides: list[str] = field(default_factory=list)  # key=value overrides for synth's generator config
    device: str = "cpu"  # auto | cpu | cuda: cpu = DataLoader workers; cuda (auto on a GPU) = batched on the GPU


@dataclass
class MedicalConfig:
    manifest: str | None = None  # CSV manifest (common.data format); either this or `directory`
    directory: str | None = None  # a folder searched recursively for *.nii / *.nii.gz
    intensity: str = "zscore"  # common's intensity normalisation: zscore | percentile
    crop_from: list[int] | None = None  # preprocess to this (D, H, W), take random data.shape crops; None: none
    flip_prob: float = 0.5  # per-axis random flip probability


@dataclass
class VideoConfig:
    paths: list[str] = field(default_factory=list)  # video files and/or directories (searched recursively)
    stride: int = 2  # frames between consecutive clip frames (temporal subsampling)
    reader: str = "auto"  # VIDEO_READERS: decord when installed, PyAV as fallback
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".avi", ".mkv", ".webm", ".mov"])


@dataclass
class PackedConfig:
    directory: str | None = None  # a folder written by `python -m pretrain.pack` (preprocessed, memory-mapped)
    flip_prob: float = 0.5  # per-axis random flip probability


@dataclass
class MixedConfig:
    # sampling weight of each corpus in the mixture; 0 leaves a corpus out (its settings are then not needed)
    synthmri: float = 1.0
    medical: float = 1.0
    video: float = 1.0


@dataclass
class DataConfig:
    __renamed__ = {"input_size": "shape"}  # keys of saved runs (common.config reads them as the new key)

    shape: list[int] = field(default_factory=lambda: [96, 96, 96])  # (D, H, W) fed to the model
    spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm, for MRI corpora (and metadata)
    batch_size: int = 4  # per rank, per micro-step
    num_workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    max_bad_share: float = 0.2  # stop when this share of items read so far was unreadable / too short
    min_items_for_bad_share: int = 32  # ... but only judge the share once this many items were tried
    synthmri: SynthMRIConfig = field(default_factory=SynthMRIConfig)
    medical: MedicalConfig = field(default_factory=MedicalConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    mixed: MixedConfig = field(default_factory=MixedConfig)
    packed: PackedConfig = field(default_factory=PackedConfig)


@dataclass
class ModelConfig:
    backbone: str = "vit_base_p16"  # a name from common.models.list_backbones()
    # extra create_backbone keywords (patch_size, depth ...); common.config keeps dict fields open to any key
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False  # recompute blocks in backward: less activation memory, ~30% more compute
    attn_backend: str = "auto"  # auto | sdpa | xformers | math (ViTs)


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # He et al.: 0.75 for images; VideoMAE: 0.9 for video
    masking: str = "random"  # random (per token) | tube (one spatial mask repeated along D, VideoMAE)
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (better features, He et al. Table 1)
    decoder_dim: int = 384  # light decoder: width ...
    decoder_depth: int = 4  # ... blocks ...
    decoder_heads: int = 12  # ... and heads


@dataclass
class ContrastiveConfig:
    temperature: float = 0.2  # SimCLR 0.1-0.5; MoCo v3 0.2
    proj_dim: int = 256  # output width of the projection head
    proj_hidden: int = 2048  # hidden width of projection / prediction MLPs
    momentum: float = 0.99  # MoCo v3: momentum encoder EMA at step 0, raised to 1 by a cosine over training
    queue_size: int = 0  # SimCLR / MoCo: past embeddings kept as extra negatives (small batches); 0: none
    sigma: float = 5.0  # yaware: bandwidth of the RBF kernel on age, in years (Dufumier et al. 2021)
    # weak labels for the objective's covariates (yaware's age), fixed per subject: how much of the gain is the label
    label_noise_sd: float = 0.0  # each subject's label is its covariate + N(0, sd²), in the covariate's units (years)
    label_fraction: float = 1.0  # share of subjects with a label; the others have none (SimCLR's term only)
    views: str = "augment"  # augment: one volume twice; rescan: two renderings of a subject by two scanners (synth)
    # views for registered brains: the two views of a subject must share enough that it can be told apart from
    # the others (measured: SimCLR at batch 4 stayed at chance with 0.4-1.0 crops, 3-axis flips and p=0.8
    # intensity changes; docs/pretrain.md)
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])  # random resized crop, share of each axis
    flip_axes: list[int] = field(default_factory=lambda: [0])  # flipped at random; 0 = left-right (RAS)
    affine_prob: float = 0.2  # random rotation (±15°) / scaling (±10 %)
    intensity_prob: float = 0.3  # random contrast / scale / shift
    noise_prob: float = 0.1  # Gaussian noise
    blur_prob: float = 0.1  # Gaussian blur
    bias_field_prob: float = 0.1  # MRI bias field


@dataclass
class HybridConfig:
    # mae_contrastive: loss = MAE + weight × NT-Xent. Not tuned: 0.5 puts NT-Xent near chance (ln 31 = 3.4 at batch
    # 16) at ~1.7 against norm-pix MSE's ~1.3, yet its encoder gradient was 11-43× MAE's (docs/pretrain.md)
    contrastive_weight: float = 0.5


@dataclass
class ObjectiveConfig:
    name: str = "mae"  # a name in pretrain.objectives.OBJECTIVES (mae, mae_contrastive, simclr, moco, yaware)
    mae: MAEConfig = field(default_factory=MAEConfig)  # mae, mae_contrastive
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # simclr, moco, yaware, mae_contrastive
    hybrid: HybridConfig = field(default_factory=HybridConfig)  # mae_contrastive


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # peak learning rate (after warm-up), for the global batch as configured
    min_lr_ratio: float = 0.0  # cosine floor as a share of lr
    weight_decay: float = 0.05  # AdamW decay on weights; off for norms, biases, position embeddings, tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # MAE's AdamW betas
    warmup_steps: int = 40  # linear warm-up, optimizer steps
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    accumulation_steps: int = 1  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the run
    precision: str = "auto"  # auto (bf16 where the hardware has it) | bf16 | fp32
    seed: int = 0  # data streams, masking and initialisation derive from it
    log_every: int = 10  # scalars to TensorBoard and metrics.jsonl
    image_every: int = 100  # MAE input / masked / reconstruction slices; 0 disables
    checkpoint_every: int = 100  # DeepSpeed checkpoint (+ export) every N steps; 0: only at the end
    keep_checkpoints: int = 2  # older checkpoint tags are deleted
    max_nonfinite_streak: int = 10  # stop after this many NaN/Inf losses in a row


@dataclass
class PretrainConfig:
    corpus: str = "synthmri"  # a name in pretrain.corpora.CORPORA (the --corpus flag sets it)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def validate(cfg: PretrainConfig) -> None:
    """Raise ``ConfigError`` naming the first field whose value the run cannot use (before any work starts)."""
    choices = {
        "corpus": (cfg.corpus, tuple(CORPORA)),
        "objective.name": (cfg.objective.name, tuple(OBJECTIVES)),
        "objective.mae.masking": (cfg.objective.mae.masking, MASKINGS),
        "data.video.reader": (cfg.data.video.reader, VIDEO_READERS),
        "model.attn_backend": (cfg.model.attn_backend, BACKENDS),
        "train.precision": (cfg.train.precision, PRECISIONS),
        "data.synthmri.device": (cfg.data.synthmri.device, DEVICES),
        "objective.contrastive.views": (cfg.objective.contrastive.views, VIEWS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    d, mae, con = cfg.data, cfg.objective.mae, cfg.objective.contrastive
    if len(d.shape) != 3 or min(d.shape) < 1:
        raise ConfigError(f"data.shape must be three positive sizes (D, H, W), got {list(d.shape)}")
    if cfg.train.steps < 1 or d.batch_size < 1:
        raise ConfigError("train.steps and data.batch_size must be >= 1")
    if d.video.stride < 1:
        raise ConfigError(f"data.video.stride must be >= 1, got {d.video.stride}")
    if not 0.0 < mae.mask_ratio < 1.0:
        raise ConfigError(f"objective.mae.mask_ratio must lie in (0, 1), got {mae.mask_ratio}")
    if mae.decoder_dim % mae.decoder_heads:
        raise ConfigError(
            f"objective.mae.decoder_dim {mae.decoder_dim} is not divisible by decoder_heads {mae.decoder_heads}"
        )
    if con.temperature <= 0:
        raise ConfigError(f"objective.contrastive.temperature must be > 0, got {con.temperature}")
    if not 0.0 <= con.momentum <= 1.0:
        raise ConfigError(f"objective.contrastive.momentum must lie in [0, 1], got {con.momentum}")
    lo, hi = con.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"objective.contrastive.crop_scale must be (low, high) in (0, 1], got {list(con.crop_scale)}")
    if con.queue_size < 0 or con.sigma <= 0:
        raise ConfigError(
            f"objective.contrastive.queue_size must be >= 0 and sigma > 0, got {con.queue_size} and {con.sigma}"
        )
    if any(int(a) not in (0, 1, 2) for a in con.flip_axes):
        raise ConfigError(f"objective.contrastive.flip_axes must name axes 0, 1, 2, got {list(con.flip_axes)}")
    if rescan_views(cfg) and not CORPORA[cfg.corpus].rescans:
        raise ConfigError(
            f"objective.contrastive.views=rescan needs two renderings of each subject, which corpus {cfg.corpus} "
            "has not; use corpus synthmri (on the fly, or a folder made by `python -m synth generate --renderings 2`)"
        )
    if not (con.label_noise_sd >= 0 and 0 <= con.label_fraction <= 1):
        raise ConfigError(
            "objective.contrastive.label_noise_sd must be >= 0 and label_fraction in [0, 1], got "
            f"{con.label_noise_sd} and {con.label_fraction}"
        )
    if (con.label_noise_sd or con.label_fraction < 1) and not OBJECTIVES[cfg.objective.name].cls.needs_covariates:
        raise ConfigError(
            f"objective.contrastive.label_noise_sd / label_fraction weaken the covariates an objective learns from, "
            f"but objective {cfg.objective.name} uses none; use yaware"
        )
    if not cfg.objective.hybrid.contrastive_weight >= 0:
        raise ConfigError(
            f"objective.hybrid.contrastive_weight must be >= 0, got {cfg.objective.hybrid.contrastive_weight}"
        )
    check_covariates(cfg)


def check_covariates(cfg: PretrainConfig) -> None:
    """The covariates the objective needs (its class's ``needs_covariates``) must come with the corpus's batches
    (its registered ``covariates``)."""
    needs = OBJECTIVES[cfg.objective.name].cls.needs_covariates
    has = CORPORA[cfg.corpus].covariates
    if cfg.corpus == "medical" and cfg.data.medical.manifest is None:
        has = ()  # a folder of NIfTI files carries no covariates
    missing = [c for c in needs if c not in has]
    if missing:
        raise ConfigError(
            f"objective {cfg.objective.name} needs the covariate(s) {', '.join(missing)} of every item, but corpus "
            f"{cfg.corpus} has no {', '.join(missing)}"
            + (" (a folder of NIfTI files has none)" if cfg.corpus == "medical" else "")
            + "; use corpus synthmri, or medical with data.medical.manifest holding an age column"
        )
