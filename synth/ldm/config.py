"""Settings of ``ldm-train``: one typed dataclass tree; defaults here, recipes in ``configs/synth/ldm*.yaml``.

Network fields are MONAI's own keyword arguments (``AutoencoderKL``, ``DiffusionModelUNet``), so an
architecture reads the same here, in a saved model's ``ldm.json`` and in a MONAI bundle's ``inference.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from common.data import PreprocessConfig
from common.errors import ConfigError
from common.precision import DEVICES, PRECISIONS
from synth.regions import CSF, VENTRICLES

CONDITIONING_MODES = ("crossattn", "concat", "both")


@dataclass
class LDMDataConfig:
    """Training images and where the conditioning covariates come from."""

    manifest: str = ""  # CSV (path, subject_id, ..., age, sex, + label_path or ventricle_volume/brain_volume)
    spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm; resampled to this
    shape: list[int] = field(default_factory=lambda: [80, 96, 80])  # (D, H, W); divisible by the total downsampling
    intensity: str = "percentile"  # the LDM models [0, 1] intensities, as the public bundle does
    crop_foreground: bool = True  # centre the brain's bounding box (off for volumes on one template grid)
    label_column: str = "label_path"  # manifest column of label maps, when volumes are measured from them
    # label values of the label maps: defaults are the anatomy-model generator's (synth/regions.py);
    # FreeSurfer aseg: ventricle_labels [4, 5, 14, 15, 43, 44], non_brain_labels [0, 24]
    ventricle_labels: list[int] = field(default_factory=lambda: list(VENTRICLES))
    non_brain_labels: list[int] = field(default_factory=lambda: [0, CSF])
    num_workers: int = 2  # DataLoader worker processes decoding NIfTI while the model trains
    max_bad_fraction: float = 0.05  # stop when more than this share of samples read so far was unreadable

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(
            spacing=tuple(self.spacing),
            shape=tuple(self.shape),
            intensity=self.intensity,
            crop_foreground=self.crop_foreground,
        )


@dataclass
class AutoencoderArch:
    """``monai.networks.nets.AutoencoderKL`` keyword arguments (spatial_dims 3, one channel in and out)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # per level; 2**(levels-1) downsampling
    latent_channels: int = 3  # the public bundle's value
    num_res_blocks: int = 1
    norm_num_groups: int = 16  # must divide every channel count
    norm_eps: float = 1e-6
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, False])  # one per level
    with_encoder_nonlocal_attn: bool = False  # full self-attention over the latent grid: costly in 3D
    with_decoder_nonlocal_attn: bool = False

    def kwargs(self) -> dict:
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, **asdict(self)}


@dataclass
class UNetArch:
    """``monai.networks.nets.DiffusionModelUNet`` keyword arguments; in/out channels follow the latent."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_head_channels: list[int] = field(default_factory=lambda: [0, 64, 64])  # 0 where a level has no attention
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    norm_eps: float = 1e-6
    resblock_updown: bool = True  # as the public bundle
    transformer_num_layers: int = 1
    upcast_attention: bool = True  # attention in fp32 under bf16 autocast (softmax of 4-d contexts is sharp)
    # how covariates enter: cross-attention context, extra input channels, or both (the public bundle: both)
    conditioning: str = "both"

    def kwargs(self, latent_channels: int, n_cond: int) -> dict:
        d = asdict(self)
        mode = d.pop("conditioning")
        return {
            "spatial_dims": 3,
            "in_channels": latent_channels + (n_cond if mode in ("concat", "both") else 0),
            "out_channels": latent_channels,
            "with_conditioning": mode in ("crossattn", "both"),
            "cross_attention_dim": n_cond if mode in ("crossattn", "both") else None,
            **d,
        }


@dataclass
class NoiseSchedule:
    """``DDPMScheduler`` / ``DDIMScheduler`` arguments, shared by training and sampling (the bundle's)."""

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    clip_sample: bool = False  # latents are not bounded to [-1, 1]


@dataclass
class AutoencoderTraining:
    """Stage 1: reconstruct images through the KL-regularised latent (L1 + KL, optional patch adversarial)."""

    steps: int = 2000
    batch_size: int = 2
    lr: float = 1e-4
    kl_weight: float = 1e-6  # small: the latent must stay informative; only keeps its scale in check
    adv_weight: float = 0.0  # > 0 adds a PatchGAN discriminator (sharper images, slower, less stable)
    adv_start: int = 0  # step at which the adversarial term starts (after L1 has shaped the decoder)
    disc_channels: int = 32  # first-layer width of the PatchGAN discriminator
    disc_layers: int = 3  # its strided layers: patches see ~2**layers voxels; needs volumes >= 3 * 2**layers
    log_every: int = 20  # scalars to TensorBoard (a host sync, so not every step)
    image_every: int = 200  # input / reconstruction slices to TensorBoard
    checkpoint_every: int = 200


@dataclass
class DiffusionTraining:
    """Stage 2: predict the noise added to scaled latents, conditioned on the covariates."""

    steps: int = 4000
    batch_size: int = 2
    lr: float = 1e-4
    # latents are multiplied by this for diffusion; 0 = 1 / std of the first batch's latents (Rombach et al.)
    scale_factor: float = 0.0
    log_every: int = 20
    image_every: int = 500  # samples across ages to TensorBoard
    image_ddim_steps: int = 25
    checkpoint_every: int = 500


@dataclass
class LDMTrainConfig:
    """Everything ``ldm-train`` needs; the resolved copy is written to ``OUT/config.yaml``."""

    data: LDMDataConfig = field(default_factory=LDMDataConfig)
    autoencoder: AutoencoderArch = field(default_factory=AutoencoderArch)
    unet: UNetArch = field(default_factory=UNetArch)
    noise: NoiseSchedule = field(default_factory=NoiseSchedule)
    train_autoencoder: AutoencoderTraining = field(default_factory=AutoencoderTraining)
    train_diffusion: DiffusionTraining = field(default_factory=DiffusionTraining)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the device computes it natively) | bf16 | fp32
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N (common.precision)

    def __post_init__(self) -> None:
        validate(self)


def _downsampling(levels: int) -> int:
    return 2 ** (levels - 1)


def validate(cfg: LDMTrainConfig) -> None:
    """Raise ``ConfigError`` naming the key when the networks cannot be built or do not fit the shape."""
    ae, un = cfg.autoencoder, cfg.unet
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device must be one of {DEVICES} (or cuda:N), got {cfg.device!r}")
    if un.conditioning not in CONDITIONING_MODES:
        raise ConfigError(f"unet.conditioning must be one of {CONDITIONING_MODES}, got {un.conditioning!r}")
    for name, arch in (("autoencoder", ae), ("unet", un)):
        if len(arch.attention_levels) != len(arch.channels):
            raise ConfigError(
                f"{name}.attention_levels needs one entry per level of {name}.channels "
                f"({len(arch.channels)}), got {len(arch.attention_levels)}"
            )
        bad = [c for c in arch.channels if c % arch.norm_num_groups]
        if bad:
            raise ConfigError(
                f"{name}.norm_num_groups={arch.norm_num_groups} must divide every channel count; "
                f"it does not divide {bad}"
            )
    if len(un.num_head_channels) != len(un.channels):
        raise ConfigError(f"unet.num_head_channels needs one entry per level ({len(un.channels)})")
    last = len(un.channels) - 1  # the middle block always has attention, with the last level's heads
    for level, (att, heads, ch) in enumerate(zip(un.attention_levels, un.num_head_channels, un.channels)):
        if heads < 0 or ((att or level == last) and (heads == 0 or ch % heads)):
            raise ConfigError(
                f"unet.num_head_channels[{level}]={heads} must be > 0 and divide "
                f"unet.channels[{level}]={ch} where that level has attention (and at the last level)"
            )
    factor = _downsampling(len(ae.channels)) * _downsampling(len(un.channels))
    bad_axes = [s for s in cfg.data.shape if s % factor]
    if len(cfg.data.shape) != 3 or bad_axes:
        raise ConfigError(
            f"data.shape {list(cfg.data.shape)} must be three sizes divisible by {factor} (the "
            f"autoencoder's then the UNet's downsampling); change data.shape or the channel lists"
        )
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction must lie in [0, 1], got {cfg.data.max_bad_fraction}")
    tae = cfg.train_autoencoder
    if tae.adv_weight > 0 and (tae.disc_layers < 1 or min(cfg.data.shape) < 3 * 2**tae.disc_layers):
        raise ConfigError(
            f"train_autoencoder.disc_layers={tae.disc_layers} needs volumes of at least "
            f"{3 * 2 ** max(tae.disc_layers, 1)} voxels per axis, data.shape is {list(cfg.data.shape)}; "
            "lower disc_layers (>= 1) or set adv_weight=0"
        )
    for name, stage in (
        ("train_autoencoder", cfg.train_autoencoder),
        ("train_diffusion", cfg.train_diffusion),
    ):
        if stage.steps < 0 or stage.batch_size < 1 or stage.lr <= 0:
            raise ConfigError(f"{name}: steps >= 0, batch_size >= 1 and lr > 0 are required")
        for key in ("log_every", "image_every", "checkpoint_every"):
            if getattr(stage, key) < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(stage, key)}")


def latent_shape(cfg: LDMTrainConfig) -> tuple[int, int, int, int]:
    """``(C, d, h, w)`` of the autoencoder's latent for ``data.shape``."""
    f = _downsampling(len(cfg.autoencoder.channels))
    return (cfg.autoencoder.latent_channels, *(s // f for s in cfg.data.shape))
