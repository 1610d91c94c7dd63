"""Render a subject plan into a volume: warp the anatomy once, then add the scanner's artefacts.

Per volume: template-space image (one matrix product over 5 tissue channels) -> lattice fields (pose,
integrated random velocity, atrophy displacement; bias) -> one trilinear upsample of (grid, bias) -> one
``grid_sample`` -> bias, acquisition resolution, noise, gamma -> clip to [0, 1]. Labels (optional) take one
nearest ``grid_sample``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synth.anatomy import BRAIN_CENTRE_MM, anatomy_at, output_affine
from synth.artefacts import acquire, brain_mask, k_space_artefacts, log_bias_field
from synth.atrophy import atrophy_basis, atrophy_displacement, template_lattice
from synth.config import SynthConfig
from synth.contrast import form_image, source_weights
from synth.deformation import Lattice, compose_grid, integrate, random_pose, random_velocity, registered_pose
from synth.regions import CSF, GM, WM
from synth.resize import resize
from synth.subject import SubjectPlan


@dataclass
class SyntheticVolume:
    image: torch.Tensor  # (1, D, H, W) float32 in [0, 1]
    labels: torch.Tensor | None  # (D, H, W) uint8, synth.regions.LABELS
    affine: np.ndarray  # (4, 4) RAS+ voxel -> mm
    plan: SubjectPlan
    head_scale: float  # the subject's native head size relative to the template
    image_scale: float  # the global scale the image shows it at (head_scale in native space)


def head_scale(cfg: SynthConfig, plan: SubjectPlan) -> float:
    """The subject's head-size factor without making the volume (the pose is its volume seed's first draw)."""
    return random_pose(cfg.affine, np.random.default_rng(plan.volume_seed), plan.sex)[2]


def warm_up(cfg: SynthConfig) -> None:
    """Build this process's template caches for ``cfg`` now (the anatomy at its spacing, the atrophy basis: a
    few seconds at 1-2 mm). Before forking workers (DataLoader, a cohort's pool), so that they share the caches
    instead of each building its own before its first volume."""
    anatomy_at(cfg.spacing, cfg.atrophy.ad_pattern)
    atrophy_basis(cfg.nonlinear.grid_lattice_mm)


class Generator:
    """Makes volumes for one config; the template resamples are cached per process (``warm_up``, or first use)."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.shape = cfg.shape
        self.affine = output_affine(cfg.spacing, self.shape)
        self.anatomy = anatomy_at(cfg.spacing, cfg.atrophy.ad_pattern)
        self.velocity_lattice = template_lattice(cfg.nonlinear.lattice_mm)
        self.atrophy_lattice = template_lattice(cfg.nonlinear.grid_lattice_mm)
        self.basis = atrophy_basis(cfg.nonlinear.grid_lattice_mm)
        first = self.affine[:3, 3]
        last = first + cfg.spacing * (np.asarray(self.shape) - 1)
        self.out_lattice = Lattice.spanning(first, last, cfg.nonlinear.grid_lattice_mm)
        self.source_lattice = Lattice(
            origin=self.anatomy.origin_mm,
            step=np.full(3, self.anatomy.spacing),
            size=tuple(self.anatomy.source.shape[1:]),
        )
        self._sources: dict[torch.device, torch.Tensor] = {torch.device("cpu"): self.anatomy.source}

    def _where(self, plan: SubjectPlan, rng: np.random.Generator) -> tuple[torch.Tensor, int, float, float]:
        """Where each lattice point reads the template: grid (d, h, w, 3), noise seed, head and image scale."""
        cfg = self.cfg
        matrix, shift, head = random_pose(cfg.affine, rng, plan.sex)  # first draw: see head_scale()
        noise_seed = int(rng.integers(2**62))  # drawn by every rendering, so the shape draws after it stay the same
        if plan.acquisition_seed is not None:  # a rescan (synth.subject.rendering): its own noise and pose
            noise_seed = int(np.random.default_rng(plan.acquisition_seed).integers(2**62))
        image_scale = head
        if cfg.pipeline.name == "t1-linear":  # registered: from a child seed, so the shape draws stay the same
            matrix, shift = registered_pose(cfg.pipeline, np.random.default_rng([noise_seed, 1]))
            image_scale = 1.0
        velocity = random_velocity(cfg.nonlinear, rng, self.velocity_lattice)  # (3, d, h, w) mm
        shape_warp = integrate(velocity, self.velocity_lattice, cfg.nonlinear.integration_steps)
        atrophy = atrophy_displacement(plan.effects, self.basis)
        where = compose_grid(
            self.out_lattice,
            (matrix, shift),
            BRAIN_CENTRE_MM,
            [(shape_warp, self.velocity_lattice), (atrophy, self.atrophy_lattice)],
        )
        return self.source_lattice.normalise(where), noise_seed, head, image_scale

    def _lattice_stage(self, plan: SubjectPlan) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
        """Per subject, on the CPU (lattices of 4-8 mm): the (grid, log bias) fields ``(4, d, h, w)``, the
        tissue weights ``(5,)``, the noise seed, the head and image scale, all drawn from the plan's volume seed
        (a rescan's noise, residual pose and bias from its acquisition seed)."""
        rng = np.random.default_rng(plan.volume_seed)
        cfg, scanner = self.cfg, plan.scanner
        grid, noise_seed, head, image_scale = self._where(plan, rng)  # grid (d, h, w, 3)
        bias_rng = rng if plan.acquisition_seed is None else np.random.default_rng([noise_seed, 2])
        bias_sd = scanner.bias_sd * (cfg.pipeline.bias_residual if cfg.pipeline.name == "t1-linear" else 1.0)
        bias = log_bias_field(self.out_lattice, bias_sd, cfg.scanner.bias_control_spacing_mm, bias_rng)
        coarse = torch.cat([grid.permute(3, 0, 1, 2), bias[None]])  # (4, d, h, w)
        return coarse, source_weights(np.asarray(scanner.means), plan.effects), noise_seed, head, image_scale

    def labels(self, plan: SubjectPlan) -> tuple[torch.Tensor, float, float]:
        """The label map alone (D, H, W) uint8, with head and image scale: what calibration measures, without
        the cost of the image (the same draws as ``__call__``, so the same labels)."""
        grid, _, head, image_scale = self._where(plan, np.random.default_rng(plan.volume_seed))
        fine = resize(grid.permute(3, 0, 1, 2), self.shape, align_corners=True)[None]  # (1, 3, D, H, W)
        weights = source_weights(np.asarray(plan.scanner.means), plan.effects)
        return self._labels(fine.permute(0, 2, 3, 4, 1), weights, plan), head, image_scale

    def _scanner(self, image: torch.Tensor, plan: SubjectPlan, noise_seed: int) -> torch.Tensor:
        """(1, 1, D, H, W) after the bias -> acquisition resolution, noise, gamma, clip -> (1, D, H, W); under
        ``t1-linear`` the background (outside the brain) is zero, as a skull-stripping pipeline's brain mask leaves
        it (otherwise the noise floor enters every z-scoring and shifts each site's brain intensities)."""
        scanner = plan.scanner
        cfg = self.cfg
        brain = brain_mask(image, cfg.pipeline, cfg.spacing, noise_seed) if cfg.pipeline.name == "t1-linear" else None
        image = k_space_artefacts(image, scanner, cfg.spacing)  # ringing, motion ghosts (when the scanner has them)
        noise_gen = torch.Generator(image.device).manual_seed(noise_seed)
        image = acquire(image, self.cfg.spacing, scanner.resolution_mm, scanner.noise_sd, scanner.rician, noise_gen)
        image = image.clamp_(0.0, 1.0).pow_(scanner.gamma)
        return (image if brain is None else image * brain)[0]

    def __call__(self, plan: SubjectPlan, with_labels: bool = False) -> SyntheticVolume:
        coarse, weights, noise_seed, head, image_scale = self._lattice_stage(plan)
        fine = resize(coarse, self.shape, align_corners=True)[None]  # (1, 4, D, H, W)
        grid = fine[:, :3].permute(0, 2, 3, 4, 1)  # (1, D, H, W, 3)

        # image: partial-volume mix on the template grid, one warp, then the scanner
        source = form_image(self.anatomy.source, weights)  # (1, 1, X, Y, Z)
        image = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        image = self._scanner(image * fine[:, 3:].exp_(), plan, noise_seed)  # (1, D, H, W)

        labels = self._labels(grid, weights, plan) if with_labels else None
        return SyntheticVolume(
            image=image.contiguous(),
            labels=labels,
            affine=self.affine,
            plan=plan,
            head_scale=head,
            image_scale=image_scale,
        )

    def batch(self, plans: Sequence[SubjectPlan], device: str | torch.device = "cpu") -> torch.Tensor:
        """Images ``(B, 1, D, H, W)`` of ``plans`` on ``device``: the same math as one volume at a time, with
        the voxel-wise stages (upsampling, image formation, warp, bias) as batched tensor ops on ``device``.

        The lattice stage stays per subject on the CPU (small, numpy-seeded). On the CPU a volume equals
        ``self(plan).image`` to float rounding (tested); on CUDA the noise comes from the device's own
        generator seeded alike, so it differs from the CPU's draw (same distribution), the rest does not.
        """
        device = torch.device(device)
        stages = [self._lattice_stage(plan) for plan in plans]
        coarse = torch.stack([s[0] for s in stages]).to(device)  # (B, 4, d, h, w)
        b, c = coarse.shape[:2]
        fine = resize(coarse.reshape(b * c, *coarse.shape[2:]), self.shape, align_corners=True)
        fine = fine.reshape(b, c, *self.shape)  # (B, 4, D, H, W)
        grid = fine[:, :3].permute(0, 2, 3, 4, 1)  # (B, D, H, W, 3)
        weights = torch.stack([s[1] for s in stages]).to(device)  # (B, 5)
        source = form_image(self._source_on(device), weights)  # (B, 1, X, Y, Z)
        images = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        images = images * fine[:, 3:].exp_()
        # acquisition differs per subject (block-averaging factors, noise stream): one volume at a time
        return torch.stack(
            [self._scanner(images[i : i + 1], plan, s[2]) for i, (plan, s) in enumerate(zip(plans, stages))]
        )

    def _source_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._sources:
            self._sources[device] = self.anatomy.source.to(device)
        return self._sources[device]

    def _labels(self, grid: torch.Tensor, weights: torch.Tensor, plan: SubjectPlan) -> torch.Tensor:
        # tissue after cortical thinning, on the template grid; regions override; one nearest-neighbour warp
        src = self.anatomy.source
        thinned = (
            plan.effects.cortical_thinning * src[3]
            + min(plan.effects.pattern_thinning, 1 - plan.effects.cortical_thinning) * src[4]
        )
        csf, gm, wm = src[0] + thinned, src[1] - thinned, src[2]
        # argmax over (csf, gm, wm), first wins ties; elementwise: argmax(0) over channels is ~10x slower on CPU
        label = torch.where(
            (csf >= gm) & (csf >= wm),
            torch.tensor(CSF, dtype=torch.uint8),
            torch.where(gm >= wm, torch.tensor(GM, dtype=torch.uint8), torch.tensor(WM, dtype=torch.uint8)),
        )
        label[self.anatomy.brain < 0.5] = 0
        regions = self.anatomy.regions
        label = torch.where(regions > 0, regions, label)
        warped = F.grid_sample(
            label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True
        )
        return warped[0, 0].to(torch.uint8)
