"""The generator's settings: one typed dataclass tree, defaults in ``configs/synth/default.yaml``.

Every effect size is a config value so a study can make disease effects stronger or weaker without code
changes. Distances are millimetres; intensities are on the output scale [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import ConfigError

CONTRASTS = ("t1", "random")
TASKS = ("ad", "pd", "brain_age")
NOISE_TYPES = ("rician", "gaussian")
PIPELINES = ("t1-linear", "raw")
AGE_CURVES = ("power", "late")
AD_PATTERNS = ("temporal", "posterior")
MIN_SPACING_MM = 0.5  # output voxel size range; the upper end is the field of view / MIN_VOXELS
MIN_VOXELS = 8  # fewest voxels per axis a volume keeps (the template's structures still show)
MAX_FOV_MM = 512  # largest field of view (and lattice spacing) per axis
MIN_LATTICE_MM = 1.0  # finest deformation / bias lattice
MAX_STRIP_ERROR_MM = 10.0  # largest skull-stripping error: beyond it the mask is no longer a brain mask


def _tuples(obj: object, names: tuple[str, ...]) -> None:
    # OmegaConf hands sequences back as lists; keep the tuples the types say (configs then compare equal)
    for name in names:
        setattr(obj, name, tuple(float(v) for v in getattr(obj, name)))


@dataclass
class AffineConfig:
    """Random rigid + scaling pose of each subject's head relative to the template."""

    rotation_deg: float = 8.0  # max absolute rotation about each axis (uniform)
    scaling: float = 0.04  # per-axis scale factor drawn from 1 ± scaling (head shape)
    mean_head_scale: float = 0.95  # native brains are ~5 % smaller (linear) than the MNI152 template
    head_size_sd: float = 0.03  # global (isotropic) log-scale sd: within-sex ICV sd ~9 % (synth/targets.py)
    sex_head_scale: float = 0.018  # males' heads +1.8 % linear size, females' -1.8 %: male ICV ~11 % larger
    translation_mm: float = 3.0  # max absolute shift per axis; small so the brain stays inside the field of view


@dataclass
class NonlinearConfig:
    """SynthSeg-style smooth diffeomorphism: low-resolution random velocity field, integrated."""

    velocity_sd_mm: float = 2.0  # sd of the random velocity at its coarse control points
    control_spacing_mm: float = 32.0  # spacing of those control points: larger = smoother shape changes
    lattice_mm: float = 8.0  # lattice the random velocity is integrated on (it is smooth: coarse is exact enough)
    integration_steps: int = 5  # scaling-and-squaring steps (2**steps Euler sub-steps)
    grid_lattice_mm: float = 4.0  # lattice of the atrophy fields and the composed grid, upsampled to full res


@dataclass
class AtrophyConfig:
    """Covariate-driven anatomy changes. ``*_mm`` values move region boundaries by about that many mm.

    The defaults pass ``python -m synth calibrate`` (effect sizes of real T1 cohorts, ``synth/targets.py``).

    Ageing effects scale with an age factor, 0 at ``age_onset`` and 1 at ``age_max``: ``power`` is
    ``((age - age_onset) / (age_max - age_onset)) ** age_exponent`` (accelerating); ``late`` is two straight
    pieces, ``age_knee_share`` reached at ``age_knee`` and the rest after it (flat-ish, then steep). Disease
    effects add on top. Each subject's effects are multiplied by a log-normal factor with sd ``individual_sd``,
    and its hippocampi, ventricles and AD-pattern cortex get offsets of their own (``*_sd_mm``, ``pattern_sd``;
    independent of age and diagnosis), so two subjects with the same covariates differ.
    """

    age_onset: float = 20.0
    age_max: float = 90.0
    age_curve: str = "power"  # power | late: the shape of the age factor between onset and age_max
    age_exponent: float = 1.5  # power curve: the exponent
    age_knee: float = 60.0  # late curve: the age after which ageing steepens (Raz et al. 2005, Fjell et al. 2013)
    age_knee_share: float = 0.2  # late curve: share of the age_max effect reached at age_knee
    ventricle_young_mm: float = -2.5  # lateral-ventricle boundary at age_onset (< 0: smaller than the template's)
    ventricle_age_mm: float = 4.5  # lateral-ventricle boundary reached at age_max (from ventricle_young_mm at onset)
    ventricle_ad_mm: float = 2.5  # extra enlargement in AD
    ventricle_pd_mm: float = 0.2  # slight enlargement in PD
    hippocampus_age_mm: float = 0.6  # hippocampal shrinkage reached at age_max
    hippocampus_ad_mm: float = 0.85  # extra hippocampal (medial-temporal) shrinkage in AD
    cortical_thinning_age: float = 0.65  # share of boundary grey matter turned to CSF at age_max
    cortical_thinning_ad: float = 0.1  # extra global thinning in AD
    ad_pattern: str = "temporal"  # temporal | posterior: the cortex AD thins extra (typical AD, or PCA-like)
    pattern_thinning_ad: float = 0.35  # extra thinning of the ad_pattern's cortex in AD
    midbrain_pd_mm: float = 0.12  # midbrain / substantia-nigra shrinkage in PD
    putamen_pd_mm: float = 0.09  # putamen shrinkage in PD
    individual_sd: float = 0.25  # log-normal sd of each subject's effect multiplier
    hippocampus_sd_mm: float = 0.65  # sd of each subject's own hippocampal boundary offset (anatomy, not age)
    ventricle_sd_mm: float = 0.0  # sd of each subject's own lateral-ventricle boundary offset
    pattern_sd: float = 0.22  # half-normal sd of each subject's own thinning of the ad_pattern's cortex (any diagnosis)
    max_mm: float = 4.5  # cap on any boundary movement: keeps the (not integrated) atrophy warp fold-free


@dataclass
class ContrastConfig:
    """Tissue intensities. ``t1``: WM > GM > CSF (jittered); ``random``: independent uniform tissue means."""

    t1_csf: float = 0.18
    t1_gm: float = 0.48
    t1_wm: float = 0.78
    t1_site_sd: float = 0.06  # sd of a site's shift of each tissue mean (sequence / vendor: GM/WM contrast differs)
    t1_subject_sd: float = 0.01  # sd of each subject's further shift (one protocol: small, ~2 %)
    min_gap: float = 0.08  # t1 ordering is enforced with at least this gap between neighbouring tissues
    random_low: float = 0.03  # range of a tissue mean under ``random``
    random_high: float = 0.9
    gamma_log_sd: float = 0.12  # log-sd of a gamma (contrast curve) change, SynthSeg style; 0 turns it off


@dataclass
class ScannerConfig:
    """Ranges a site's (scanner's) profile is drawn from; a subject jitters around its site's profile."""

    bias_sd: tuple[float, float] = (0.05, 0.25)  # sd of the log bias field (multiplicative intensity shading)
    bias_control_spacing_mm: float = 48.0  # smoothness of the bias field
    # noise sd on the [0, 1] intensity scale: WM SNR ~100 down to ~13 (3 T vs 1.5 T, coils, acceleration)
    noise_sd: tuple[float, float] = (0.008, 0.06)
    rician_probability: float = 0.7  # share of sites with Rician (magnitude) noise, the rest Gaussian
    inplane_mm: tuple[float, float] = (0.9, 1.4)  # acquired in-plane resolution (not finer than output)
    slice_mm: tuple[float, float] = (1.0, 3.5)  # acquired slice thickness along one axis
    subject_noise_log_sd: float = 0.08  # each subject's noise sd varies around the site's by this log-sd
    ringing_probability: float = 0.0  # share of sites whose k-space is truncated along phase encoding (Gibbs)
    ringing_mm: tuple[float, float] = (2.0, 3.0)  # resolution that truncated k-space reaches (a ringing site's)
    ghost_probability: float = 0.0  # share of subjects who move: attenuated replicas along phase encoding
    ghost_amplitude: tuple[float, float] = (0.05, 0.2)  # a moving subject's ghost intensity / the image's

    def __post_init__(self) -> None:
        _tuples(self, ("bias_sd", "noise_sd", "inplane_mm", "slice_mm", "ringing_mm", "ghost_amplitude"))


@dataclass
class PipelineConfig:
    """What a standard T1 pipeline has done to the images a model sees. ``t1-linear`` (ClinicaDL's: N4 bias
    correction, affine registration to MNI): head size and pose gone but for a residual, a little bias left, the
    background outside the brain zero (skull-stripping's brain mask). ``raw``: native space and size, the scanner's
    full bias field and its noise floor in the background (e.g. for contrast-agnostic pre-training)."""

    name: str = "t1-linear"  # t1-linear | raw
    rotation_deg: float = 1.0  # residual |rotation| per axis that affine registration leaves
    translation_mm: float = 1.0  # residual |shift| per axis
    scaling: float = 0.01  # residual per-axis scale 1 ± scaling (head size itself is normalised away)
    bias_residual: float = 0.1  # share of the scanner's log bias field N4 leaves
    strip_error_mm: tuple[float, float] = (0.0, 0.0)  # range of a subject's brain-mask error: < 0 cuts, > 0 leaves

    def __post_init__(self) -> None:
        _tuples(self, ("strip_error_mm",))


@dataclass
class CohortConfig:
    """Who is in a labelled cohort and a pre-training corpus."""

    ad_age: tuple[float, float] = (55.0, 90.0)  # ages drawn uniformly in task ad (both groups)
    pd_age: tuple[float, float] = (45.0, 85.0)  # ages in task pd
    brain_age_age: tuple[float, float] = (20.0, 90.0)  # ages in task brain_age (all CN)
    corpus_age: tuple[float, float] = (20.0, 90.0)  # ages in ``generate`` / the on-the-fly corpus
    corpus_ad_fraction: float = 0.15  # share of AD subjects in the pre-training corpus
    corpus_pd_fraction: float = 0.15  # share of PD subjects in the pre-training corpus

    def __post_init__(self) -> None:
        _tuples(self, ("ad_age", "pd_age", "brain_age_age", "corpus_age"))


@dataclass
class SynthConfig:
    """Everything that decides a synthetic volume, apart from the seed and the subject's index."""

    spacing: float = 1.0  # output voxel size in mm (isotropic)
    shape_1mm: tuple[int, int, int] = (160, 192, 160)  # field of view in voxels at 1 mm; scaled at other spacings
    contrast: str = "t1"  # "t1" or "random"
    affine: AffineConfig = field(default_factory=AffineConfig)
    nonlinear: NonlinearConfig = field(default_factory=NonlinearConfig)
    atrophy: AtrophyConfig = field(default_factory=AtrophyConfig)
    intensity: ContrastConfig = field(default_factory=ContrastConfig)
    scanner: ScannerConfig = field(default_factory=ScannerConfig)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        self.shape_1mm = tuple(int(s) for s in self.shape_1mm)
        validate(self)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Output (D, H, W) at ``spacing``: the 1 mm field of view scaled."""
        return tuple(max(1, round(n / self.spacing)) for n in self.shape_1mm)


def _range(name: str, value: tuple[float, float], low: float = 0.0) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ConfigError(f"synth config: {name} must be (low, high) with {low} <= low <= high, got {tuple(value)}")


def validate(cfg: SynthConfig) -> None:
    """Raise ConfigError naming the key when a value cannot work (checked before any volume is made)."""
    if len(cfg.shape_1mm) != 3 or not MIN_VOXELS <= min(cfg.shape_1mm) <= max(cfg.shape_1mm) <= MAX_FOV_MM:
        raise ConfigError(
            f"synth config: shape_1mm must be three sizes in [{MIN_VOXELS}, {MAX_FOV_MM}] mm (MNI152 spans "
            f"~182x218x182 mm), got {cfg.shape_1mm}"
        )
    # Coarser than this leaves fewer than MIN_VOXELS voxels per axis (and pre-blurs the template for minutes);
    # finer only interpolates the 1 mm template at 8x the memory per halving.
    coarsest = min(cfg.shape_1mm) / MIN_VOXELS
    if not cfg.spacing > 0:
        raise ConfigError(f"synth config: spacing must be > 0 mm (--spacing), got {cfg.spacing}")
    if not MIN_SPACING_MM <= cfg.spacing <= coarsest:
        raise ConfigError(
            f"synth config: spacing must lie in [{MIN_SPACING_MM:g}, {coarsest:g}] mm (--spacing; the "
            f"{'x'.join(map(str, cfg.shape_1mm))} mm field of view needs >= {MIN_VOXELS} voxels per axis), "
            f"got {cfg.spacing:g}"
        )
    if cfg.pipeline.name not in PIPELINES:
        raise ConfigError(f"synth config: pipeline.name must be one of {PIPELINES}, got {cfg.pipeline.name!r}")
    if not 0 <= cfg.pipeline.bias_residual <= 1:
        raise ConfigError(f"synth config: pipeline.bias_residual must lie in [0, 1], got {cfg.pipeline.bias_residual}")
    if cfg.contrast not in CONTRASTS:
        raise ConfigError(f"synth config: contrast must be one of {CONTRASTS}, got {cfg.contrast!r}")
    lattices = {
        "nonlinear.lattice_mm": cfg.nonlinear.lattice_mm,
        "nonlinear.control_spacing_mm": cfg.nonlinear.control_spacing_mm,
        "nonlinear.grid_lattice_mm": cfg.nonlinear.grid_lattice_mm,
        "scanner.bias_control_spacing_mm": cfg.scanner.bias_control_spacing_mm,
    }
    for name, value in lattices.items():  # a lattice finer than 1 mm has millions of points per subject
        if not MIN_LATTICE_MM <= value <= MAX_FOV_MM:
            raise ConfigError(f"synth config: {name} must lie in [{MIN_LATTICE_MM:g}, {MAX_FOV_MM}] mm, got {value}")
    if not 0 <= cfg.atrophy.max_mm <= 5.0:
        raise ConfigError(
            f"synth config: atrophy.max_mm must lie in [0, 5] (larger warps fold), got {cfg.atrophy.max_mm}"
        )
    if not -cfg.atrophy.max_mm <= cfg.atrophy.ventricle_young_mm <= cfg.atrophy.max_mm:
        raise ConfigError("synth config: atrophy.ventricle_young_mm must lie in [-max_mm, max_mm]")
    a = cfg.atrophy
    if a.age_curve not in AGE_CURVES:
        raise ConfigError(f"synth config: atrophy.age_curve must be one of {AGE_CURVES}, got {a.age_curve!r}")
    if a.ad_pattern not in AD_PATTERNS:
        raise ConfigError(f"synth config: atrophy.ad_pattern must be one of {AD_PATTERNS}, got {a.ad_pattern!r}")
    if not a.age_onset < a.age_max:
        raise ConfigError(f"synth config: atrophy.age_onset must be < age_max, got {a.age_onset} and {a.age_max}")
    if a.age_curve == "late" and not a.age_onset < a.age_knee < a.age_max:
        raise ConfigError(f"synth config: atrophy.age_knee must lie between age_onset and age_max, got {a.age_knee}")
    if not 0 <= a.age_knee_share <= 1:
        raise ConfigError(f"synth config: atrophy.age_knee_share must lie in [0, 1], got {a.age_knee_share}")
    for name in ("hippocampus_sd_mm", "ventricle_sd_mm"):
        if not 0 <= getattr(a, name) <= a.max_mm:
            raise ConfigError(f"synth config: atrophy.{name} must lie in [0, max_mm], got {getattr(a, name)}")
    if not 0 <= a.pattern_sd <= 0.9:
        raise ConfigError(f"synth config: atrophy.pattern_sd must lie in [0, 0.9] (a share), got {a.pattern_sd}")
    if cfg.nonlinear.integration_steps < 0:
        raise ConfigError("synth config: nonlinear.integration_steps must be >= 0")
    s = cfg.scanner
    for name in ("bias_sd", "noise_sd", "inplane_mm", "slice_mm"):
        _range(f"scanner.{name}", getattr(s, name))
    _range("scanner.ringing_mm", s.ringing_mm, low=MIN_SPACING_MM)
    _range("scanner.ghost_amplitude", s.ghost_amplitude)
    for name in ("ringing_probability", "ghost_probability", "rician_probability"):
        if not 0 <= getattr(s, name) <= 1:
            raise ConfigError(f"synth config: scanner.{name} must lie in [0, 1], got {getattr(s, name)}")
    strip = cfg.pipeline.strip_error_mm
    if len(strip) != 2 or not -MAX_STRIP_ERROR_MM <= strip[0] <= strip[1] <= MAX_STRIP_ERROR_MM:
        raise ConfigError(
            f"synth config: pipeline.strip_error_mm must be (low, high) within +-{MAX_STRIP_ERROR_MM:g} mm, "
            f"got {tuple(strip)}"
        )
    for name in ("inplane_mm", "slice_mm"):  # acquisition averages blocks of round(mm / spacing) voxels
        if round(getattr(s, name)[1] / cfg.spacing) > min(cfg.shape):
            raise ConfigError(
                f"synth config: scanner.{name} up to {getattr(s, name)[1]} mm is thicker than the "
                f"{min(cfg.shape)}-voxel field of view at spacing {cfg.spacing:g} mm"
            )
    for name in ("ad_age", "pd_age", "brain_age_age", "corpus_age"):
        _range(f"cohort.{name}", getattr(cfg.cohort, name))
    c = cfg.cohort
    if c.corpus_ad_fraction < 0 or c.corpus_pd_fraction < 0 or c.corpus_ad_fraction + c.corpus_pd_fraction > 1:
        raise ConfigError("synth config: cohort.corpus_ad_fraction + corpus_pd_fraction must lie in [0, 1]")
    if not 0 <= cfg.intensity.random_low < cfg.intensity.random_high <= 1:
        raise ConfigError("synth config: intensity.random_low < intensity.random_high must lie in [0, 1]")
