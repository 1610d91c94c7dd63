"""Random head pose and smooth diffeomorphic deformation, composed on a coarse lattice into one sampling grid.

For an output point ``x`` (mm) the template is read at ``s = atrophy(phi(A^-1 x))``: ``A`` places the template
head in the subject's scanner (rotation, per-axis and head-size scaling, shift); ``phi = exp(v)`` is the
subject's own shape, a SynthSeg-style random stationary velocity field integrated by scaling and squaring (a
diffeomorphism); ``atrophy`` is the covariate-driven displacement of ``synth.atrophy``. Everything is built on
lattices of a few mm and upsampled once to the output grid: the full-resolution cost is one trilinear upsample
and one ``grid_sample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from synth.config import AffineConfig, NonlinearConfig, PipelineConfig


@dataclass(frozen=True)
class Lattice:
    """Regular points ``origin + i * step`` (mm) along each axis, ``size`` per axis."""

    origin: np.ndarray  # (3,) mm
    step: np.ndarray  # (3,) mm
    size: tuple[int, int, int]

    @staticmethod
    def spanning(lo: np.ndarray, hi: np.ndarray, step_mm: float) -> Lattice:
        """The coarsest lattice with spacing <= ``step_mm`` whose corners are exactly ``lo`` and ``hi``."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        size = tuple(int(math.ceil((h - lo_) / step_mm - 1e-6)) + 1 for lo_, h in zip(lo, hi))
        step = np.array([(h - lo_) / max(n - 1, 1) for lo_, h, n in zip(lo, hi, size)])
        return Lattice(origin=lo, step=step, size=size)

    def points(self) -> torch.Tensor:
        """``(d, h, w, 3)`` mm coordinates of the lattice points."""
        axes = [torch.from_numpy(self.origin[i] + self.step[i] * np.arange(self.size[i])).float() for i in range(3)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    def normalise(self, points_mm: torch.Tensor) -> torch.Tensor:
        """mm ``(..., 3)`` -> ``grid_sample`` coordinates ``(..., 3)`` (align_corners=True, last dim reversed:
        grid_sample's x indexes the last axis)."""
        origin = torch.as_tensor(self.origin, dtype=points_mm.dtype)
        extent = torch.as_tensor(self.step * (np.asarray(self.size) - 1), dtype=points_mm.dtype).clamp_min(1e-6)
        return (2.0 * (points_mm - origin) / extent - 1.0).flip(-1)


def sample_field(field: torch.Tensor, lattice: Lattice, points_mm: torch.Tensor) -> torch.Tensor:
    """Trilinear values of ``field`` (C, d, h, w) on ``lattice`` at ``points_mm`` (..., 3) -> (C, ...)."""
    shape = points_mm.shape[:-1]
    grid = lattice.normalise(points_mm.reshape(1, -1, 1, 1, 3))  # (1, N, 1, 1, 3)
    out = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(field.shape[0], *shape)


def random_pose(cfg: AffineConfig, rng: np.random.Generator, sex: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(M, t, head_scale): template -> subject is ``x = c + M (q - c) + t``; males' heads larger by config."""
    rot = _rotation(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    sex_scale = 1 + (cfg.sex_head_scale if sex == "M" else -cfg.sex_head_scale)
    head = float(cfg.mean_head_scale * np.exp(rng.normal(0.0, cfg.head_size_sd)) * sex_scale)
    scale = head * rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3)
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    return rot @ np.diag(scale), shift, head


def registered_pose(cfg: PipelineConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(M, t) after affine registration to the template (as ClinicaDL t1-linear's): head size and pose are
    gone but for a small residual rotation, per-axis scaling and shift."""
    rot = _rotation(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    scale = rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3)
    return rot @ np.diag(scale), rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    angles = np.deg2rad(degrees)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    return (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )


def random_velocity(cfg: NonlinearConfig, rng: np.random.Generator, lattice: Lattice) -> torch.Tensor:
    """Smooth random velocity (3, d, h, w) in mm on ``lattice``: Gaussian at coarse control points, upsampled."""
    extent = lattice.step * (np.asarray(lattice.size) - 1)
    coarse = tuple(int(math.ceil(e / cfg.control_spacing_mm)) + 1 for e in extent)
    sd = cfg.velocity_sd_mm * rng.uniform(0.5, 1.0)  # SynthSeg draws the field's strength per subject too
    v = torch.from_numpy(rng.normal(0.0, sd, (1, 3, *coarse)).astype(np.float32))
    return F.interpolate(v, size=lattice.size, mode="trilinear", align_corners=True)[0]


def integrate(velocity: torch.Tensor, lattice: Lattice, steps: int) -> torch.Tensor:
    """Displacement (3, d, h, w) mm of ``exp(velocity)`` by scaling and squaring (invertible for smooth fields)."""
    u = velocity / (2**steps)
    if steps == 0:
        return u
    points = lattice.points()  # (d, h, w, 3)
    for _ in range(steps):
        # u <- u + u o (id + u)
        u = u + sample_field(u, lattice, points + u.permute(1, 2, 3, 0))
    return u


def compose_grid(
    out_lattice: Lattice,
    pose: tuple[np.ndarray, np.ndarray],
    centre_mm: np.ndarray,
    warps: list[tuple[torch.Tensor, Lattice]],
) -> torch.Tensor:
    """Template mm read by each output lattice point -> (d, h, w, 3).

    ``q = A^-1 x`` with ``x = c + M (q - c) + t``, then each displacement ``(u, lattice)`` in turn:
    ``q <- q + u(q)``.
    """
    matrix, shift = pose
    inverse = torch.from_numpy(np.linalg.inv(matrix)).float()
    centre = torch.from_numpy(centre_mm).float()
    x = out_lattice.points()
    q = (x - centre - torch.from_numpy(shift).float()) @ inverse.T + centre
    for displacement, lattice in warps:
        q = q + sample_field(displacement, lattice, q).permute(1, 2, 3, 0)
    return q
