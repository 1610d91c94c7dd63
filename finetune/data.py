"""Volumes for fine-tuning: every manifest image read once through common's NIfTI pipeline (so a missing or
corrupt file fails before any training), kept in memory, and served with light augmentation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, RandFlip, RandScaleIntensity, RandShiftIntensity
from torch.utils.data import DataLoader, Dataset

from common.data import ManifestDataset, PreprocessConfig
from finetune.config import DataConfig


def preprocess_config(cfg: DataConfig) -> PreprocessConfig:
    return PreprocessConfig(
        spacing=tuple(cfg.spacing),
        shape=tuple(cfg.shape),
        intensity=cfg.intensity,
        crop_foreground=cfg.crop_foreground,
    )


def _first_image(items: list[dict]) -> torch.Tensor:
    return items[0]["image"]


def load_volumes(df: pd.DataFrame, cfg: DataConfig) -> torch.Tensor:
    """(N, 1, D, H, W) float32, one per manifest row in order; a bad file raises ``DataError`` naming it."""
    dataset = ManifestDataset(df[["path", "subject_id"]], preprocess_config(cfg))
    loader = DataLoader(dataset, batch_size=1, num_workers=cfg.num_workers, collate_fn=_first_image)
    return torch.stack(list(loader))  # (N, 1, D, H, W)


def augmentation(seed: int) -> Compose:
    """Light, label-preserving augmentation of a (1, D, H, W) volume: left-right flip (axis 0 is R-L in RAS),
    intensity scale and shift."""
    aug = Compose(
        [
            RandFlip(prob=0.5, spatial_axis=0),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.1, prob=0.5),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


class VolumeDataset(Dataset):
    """Items ``(volume (1, D, H, W), target)`` from preloaded volumes, augmented when ``augment``."""

    def __init__(self, volumes: torch.Tensor, targets: np.ndarray, augment: bool = False, seed: int = 0):
        self.volumes = volumes
        self.targets = torch.as_tensor(targets)
        self.transform = augmentation(seed) if augment else None

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int):
        x = self.volumes[i]
        if self.transform is not None:
            x = torch.as_tensor(self.transform(x)).float()
        return x, self.targets[i]
