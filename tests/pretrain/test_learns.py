"""Every pre-training objective learns in a tiny run: its loss falls clearly below its chance level.

Chance levels (all embeddings alike, or nothing learnt): NT-Xent and y-aware InfoNCE ln(2B − 1 + K) for batch B
and K queued negatives; MoCo v3 2 · 2T · ln(B + K) (two symmetric terms, each scaled by 2T); MAE with
per-patch normalised pixels: the loss of predicting every masked patch's mean, i.e. the mean squared normalised
target over the run's patches (1 for patches with any variance, 0 for constant ones, so below 1 with background).
The runs are the objectives on a stream of procedural "subjects" (a head-like ellipsoid with random blobs, a
fresh subject at every position, 16³), made through the contrastive views of ``pretrain/views.py`` with the
default settings, at batch 4, trained by AdamW; the DeepSpeed loop itself is tested elsewhere.
Tiny ViTs (2 blocks, 64 wide, 4³ patches) on 16³: the CNN path of the contrastive objectives is the same code
(``test_contrastive.py``, ``test_yaware.py`` train a ResNet), and a ResNet at this size learns slower than the
test budget allows.
"""

import math

import numpy as np
import pytest
import torch

from common.models import create_backbone
from common.optim import adamw
from pretrain.config import ObjectiveConfig
from pretrain.objectives import build_objective
from pretrain.views import TwoViews

SIZE, BATCH = 16, 4


def subject(index: int) -> tuple[torch.Tensor, float]:
    """A (1, 16, 16, 16) volume in [0, 1] and its age: an ellipsoid 'head' with 6 random blobs whose size
    grows with age (so age is in the images, as atrophy puts it in real ones)."""
    rng = np.random.default_rng([7, index])
    age = float(rng.uniform(20, 80))
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))  # (3, S, S, S)
    vol = 0.3 * (((g / np.array([0.8, 0.9, 0.8])[:, None, None, None]) ** 2).sum(0) < 1)
    for _ in range(6):
        centre = rng.uniform(-0.5, 0.5, 3)[:, None, None, None]
        width = rng.uniform(0.08, 0.2) * (0.6 + age / 100)
        vol = vol + rng.uniform(0.3, 0.7) * np.exp(-((g - centre) ** 2).sum(0) / (2 * width**2))
    return torch.from_numpy(np.clip(vol, 0, 1)[None].astype(np.float32)), age


def tiny_encoder(kind: str) -> torch.nn.Module:
    if kind == "cnn":
        return create_backbone("resnet18", img_size=SIZE, widen_factor=0.25)
    return create_backbone("vit_base_p16", img_size=SIZE, patch_size=4, embed_dim=64, depth=2, num_heads=4)


def tiny_run(name: str, kind: str, steps: int, lr: float = 1e-3, **contrastive) -> tuple[float, float, float]:
    """(mean loss of the first 5 steps, of the last 10, chance level) of a tiny run of objective ``name``."""
    torch.manual_seed(0)
    cfg = ObjectiveConfig(name=name)
    cfg.contrastive.proj_hidden, cfg.contrastive.proj_dim = 128, 32
    cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads = 64, 1, 4
    for key, value in contrastive.items():
        setattr(cfg.contrastive, key, value)
    model = build_objective(cfg, tiny_encoder(kind))
    views = TwoViews(cfg.contrastive, [SIZE] * 3)
    opt = adamw([p for p in model.parameters() if p.requires_grad], "cpu", lr=lr, weight_decay=0.05)
    losses, mean_patch_losses = [], []
    for step in range(steps):
        items = [subject(step * BATCH + i) for i in range(BATCH)]
        if name == "mae":
            batch = {"image": torch.stack([v for v, _ in items])}
            with torch.no_grad():  # predicting every patch's mean: the squared normalised target, over patches
                mean_patch_losses.append(model.target(batch["image"]).pow(2).mean().item())
        else:
            pairs = [views(v, np.random.default_rng([step, i])) for i, (v, _) in enumerate(items)]
            batch = {k: torch.stack([p[k] for p in pairs]) for k in ("view1", "view2")}
            batch["age"] = torch.tensor([a for _, a in items])
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(step + 1, steps)
        losses.append(loss.item())
    K, T = cfg.contrastive.queue_size, cfg.contrastive.temperature
    chance = {"mae": float(np.mean(mean_patch_losses or [0])), "moco": 4 * T * math.log(BATCH + K)}
    chance = chance.get(name, math.log(2 * BATCH - 1 + K))
    return float(np.mean(losses[:5])), float(np.mean(losses[-10:])), chance


# left-right flips only: the views a ViT learns from (docs/pretrain.md; the transfer experiment's y-aware ViT)
FLIP_VIEWS = {"crop_scale": [1.0, 1.0], "affine_prob": 0.0, "intensity_prob": 0.0}
FLIP_VIEWS.update(noise_prob=0.0, blur_prob=0.0, bias_field_prob=0.0)


@pytest.mark.parametrize(
    "name, kind, steps, settings, margin",
    [
        ("simclr", "vit", 40, {}, 0.2),  # measured 2.35 -> 1.62
        # measured 2.55 -> 1.835; last-10 mean over 6 seeds (init and subjects) 1.835, 1.809, 1.795, 1.783, 1.787,
        # 1.876 (mean 1.81, sd 0.036); 1 vs 2 threads moved it by 0.001; with lr 0 it ends at 2.59. The bar 1.926
        # lies 0.05 above the worst seed and 0.09 above this one, and 0.66 below a run that does not learn
        ("yaware", "vit", 40, {"sigma": 5.0}, 0.02),
        ("mae", "vit", 100, {}, 0.15),  # measured 1.15 -> 0.38, chance 0.64
        # MoCo v3 with the default views stays at or above chance at batch 4 in 40-150 steps (docs/pretrain.md);
        # with left-right flips as its only augmentation it learns
        ("moco", "vit", 60, {"momentum": 0.9, **FLIP_VIEWS}, 0.5),  # measured 1.22 -> 0.34
    ],
)
def test_loss_falls_below_chance(name, kind, steps, settings, margin):
    first, last, chance = tiny_run(name, kind, steps, **settings)
    assert last < chance - margin, f"{name}/{kind}: loss {first:.3f} -> {last:.3f}, chance {chance:.3f}"
