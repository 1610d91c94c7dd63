"""Latent-diffusion synthetic brain MRI: train, sample, and load the public UK Biobank brain LDM.

Built from MONAI's generative networks (``AutoencoderKL``, ``DiffusionModelUNet``), schedulers (DDPM for
training, DDIM for sampling) and ``LatentDiffusionInferer``; conditioned on sex, age, ventricular and brain
volume as in Pinaya et al. 2022. Submodules: ``config`` (training settings), ``covariates``,
``networks``, ``model`` (model folder I/O, :func:`load_model`), ``bundle`` (the MONAI bundle), ``train``
(``ldm-train``), ``sampling`` (``ldm-sample``), ``cli``.
"""

from synth.ldm.covariates import COVARIATES
from synth.ldm.load import load_model
from synth.ldm.model import LatentDiffusionModel

__all__ = ["COVARIATES", "LatentDiffusionModel", "load_model"]
