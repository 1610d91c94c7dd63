"""What the LDM test modules share: tiny network settings, the toy brains' label scheme, a toy brain."""

from __future__ import annotations

import numpy as np

from synth.ldm.covariates import LabelScheme

SCHEME = LabelScheme(ventricles=(4, 5), non_brain=(0, 1))
TINY = [
    "data.spacing=[2.0,2.0,2.0]",
    "data.shape=[16,16,16]",
    "data.num_workers=0",
    "autoencoder.channels=[8,16]",
    "autoencoder.attention_levels=[false,false]",
    "autoencoder.norm_num_groups=4",
    "unet.channels=[16,32]",
    "unet.attention_levels=[false,true]",
    "unet.num_head_channels=[0,16]",
    "unet.norm_num_groups=8",
    "train_autoencoder.batch_size=2",
    "train_diffusion.batch_size=2",
    "train_diffusion.lr=1e-3",
    "train_autoencoder.log_every=1",
    "train_diffusion.log_every=1",
    "train_autoencoder.checkpoint_every=1",
    "train_diffusion.checkpoint_every=1",
    "train_diffusion.image_every=2",
    "train_diffusion.image_ddim_steps=2",
    "precision=fp32",
    "device=cpu",
]


def toy_brain(age: float, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A ball brain (GM shell, WM core) whose central ventricle grows with age: (image, labels) at 2 mm."""
    z, y, x = np.mgrid[:size, :size, :size] - (size - 1) / 2
    r = np.sqrt(x**2 + y**2 + z**2)
    labels = np.zeros(r.shape, np.uint8)
    labels[r < 8.5] = 2
    labels[r < 6] = 3
    labels[r < 1.5 + 2.5 * (age - 20) / 60] = 4
    image = np.select([labels == 4, labels == 2, labels == 3], [0.2, 0.5, 0.8], 0.0).astype(np.float32)
    return image, labels
