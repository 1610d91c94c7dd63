"""Load a local copy of the public MONAI bundle ``brain_image_synthesis_latent_diffusion_model``.

Pinaya et al. 2022, "Brain imaging generation with latent diffusion models": UK Biobank T1w, 160x224x160 at
1 mm, conditioned on ``[gender, age, ventricular_vol, brain_vol]`` in [0, 1]. The bundle folder::

    configs/inference.json   autoencoder_def, diffusion_def, scheduler, noise shape, conditioning (MONAI 1.4)
    configs/metadata.json    spatial_shape of the output (checked when present)
    models/autoencoder.pt    AutoencoderKL weights   } as trained with MONAI Generative: older key names,
    models/model.pt          DiffusionModelUNet weights } converted by MONAI's own ``load_old_state_dict``

The networks are built from the bundle's own network definitions. ``inference.json`` is read as JSON, never
evaluated: its ``$``-expressions (noise shape, weight paths, inference steps, conditioning order) are matched
as text. Weights are read with ``torch.load(weights_only=True)`` and must fill every parameter: no silent
partial load.
The bundle's sampler decodes the final latent as is, so its scale factor is 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import load_state_dict_strict
from common.errors import CheckpointError
from common.io import load_torch_file
from synth.ldm.covariates import BUNDLE_NAMES, COVARIATES, CovariateSpace
from synth.ldm.model import LatentDiffusionModel, assemble
from synth.ldm.networks import downsampling

BUNDLE_SPACING = (1.0, 1.0, 1.0)  # mm: the bundle's training data (README: 1 mm isotropic UK Biobank T1w)
# weight file names tried when inference.json's load paths cannot be read (model-zoo names, then older ones)
_AUTOENCODER_FILES = ("autoencoder.pt", "autoencoder.pth")
_UNET_FILES = ("model.pt", "diffusion_model.pt", "diffusion_model.pth", "model.pth")
_TARGETS = {"autoencoder_def": "AutoencoderKL", "diffusion_def": "DiffusionModelUNet"}
_TARGET_PACKAGES = ("monai.networks.nets.", "generative.networks.nets.")


def is_bundle(folder: str | Path) -> bool:
    return (Path(folder) / "configs" / "inference.json").is_file()


def _network_kwargs(config: Mapping[str, Any], key: str, source: Path) -> dict[str, Any]:
    """A network definition of inference.json as plain kwargs (``_target_`` checked and dropped)."""
    if not isinstance(config.get(key), Mapping):
        raise CheckpointError(f"{source}: no {key!r} network definition")
    d = dict(config[key])
    target = str(d.get("_target_", ""))
    wanted = _TARGETS[key]
    if target not in (wanted, *(p + wanted for p in _TARGET_PACKAGES)):
        raise CheckpointError(f"{source}: {key}._target_ is {target!r}, expected monai.networks.nets.{wanted}")
    kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
    if "num_channels" in kwargs:  # MONAI Generative's name for `channels`
        kwargs["channels"] = kwargs.pop("num_channels")
    exprs = [k for k, v in kwargs.items() if isinstance(v, str) and v[:1] in ("$", "@", "%")]
    if exprs:
        raise CheckpointError(
            f"{source}: {key} sets {', '.join(exprs)} by expression; only literal values are "
            "read (expressions are never evaluated)"
        )
    return kwargs


def _weight_file(folder: Path, config: Mapping[str, Any], key: str, candidates: tuple[str, ...]) -> Path:
    names = []
    found = re.findall(r"['\"]/?([\w.\-]+\.pth?)['\"]", str(config.get(key, "")))
    names += found + [c for c in candidates if c not in found]
    for name in names:
        if (folder / "models" / name).is_file():
            return folder / "models" / name
    raise CheckpointError(
        f"{folder / 'models'}: no weight file {' or '.join(names)}; download the bundle's "
        "large files (models/*.pt, listed in its large_files.yml) into that folder"
    )


def load_monai_weights(net: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> str:
    """Load ``state`` into a MONAI network in its current key layout, or in MONAI Generative's older one.

    The old layout goes through the network's own ``load_old_state_dict``; afterwards every file key must
    have been used and every parameter filled. Returns ``"current"`` or ``"old"``.
    """
    own = net.state_dict()
    if set(state) == set(own):
        load_state_dict_strict(net, state, source)
        return "current"
    if not hasattr(net, "load_old_state_dict"):
        load_state_dict_strict(net, state, source)  # raises, listing the differences
    leftover = dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
            net.load_old_state_dict(leftover)
    except KeyError as e:
        raise CheckpointError(
            f"{source}: weights are neither in {type(net).__name__}'s layout nor in MONAI "
            f"Generative's older one: key {e} is missing"
        ) from None
    except RuntimeError as e:  # load_state_dict's size mismatch
        raise CheckpointError(
            f"{source}: weights do not fit the network built from the bundle's config ({str(e).splitlines()[0]} ...)"
        ) from None
    used = len(state) - len(leftover)
    if leftover or used != len(own):
        raise CheckpointError(
            f"{source}: old-layout weights only partly fit: {used} of {len(own)} parameters filled; "
            f"unused file keys: {', '.join(sorted(leftover)[:8]) or 'none'}"
        )
    return "old"


def _conditioning_order(config: Mapping[str, Any], source: Path) -> None:
    names = [n for n in re.findall(r"@(\w+)", str(config.get("conditioning", ""))) if n in BUNDLE_NAMES]
    order = tuple(BUNDLE_NAMES[n] for n in names)
    if order and order != COVARIATES:
        raise CheckpointError(
            f"{source}: conditioning order {names} differs from the supported {[k for k in BUNDLE_NAMES]}"
        )


def _latent_shape(config: Mapping[str, Any], source: Path) -> tuple[int, ...]:
    m = re.search(r"randn\(\s*\(([\d,\s]+)\)", str(config.get("noise", "")))
    if not m:
        raise CheckpointError(
            f"{source}: cannot read the latent shape from 'noise' "
            f"({config.get('noise')!r}); expected torch.randn((1, C, d, h, w))"
        )
    shape = tuple(int(s) for s in m.group(1).replace(" ", "").split(",") if s)
    if len(shape) != 5:
        raise CheckpointError(f"{source}: 'noise' has shape {shape}; expected (1, C, d, h, w)")
    return shape[1:]


def load_bundle(folder: str | Path) -> LatentDiffusionModel:
    """The bundle's autoencoder and diffusion UNet with its weights, scheduler and latent geometry."""
    folder = Path(folder).expanduser()
    source = folder / "configs" / "inference.json"
    try:
        config = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: cannot read the bundle config ({e})") from e

    ae_kwargs = _network_kwargs(config, "autoencoder_def", source)
    unet_kwargs = _network_kwargs(config, "diffusion_def", source)
    _conditioning_order(config, source)
    # everything checkable is checked before ~550M parameters are built
    ae_file = _weight_file(folder, config, "load_autoencoder_path", _AUTOENCODER_FILES)
    unet_file = _weight_file(folder, config, "load_diffusion_path", _UNET_FILES)
    latent = _latent_shape(config, source)
    f = downsampling(ae_kwargs)
    image_shape = tuple(s * f for s in latent[1:])
    if latent[0] != int(ae_kwargs["latent_channels"]):
        raise CheckpointError(
            f"{source}: 'noise' has {latent[0]} channels, the autoencoder's latent {ae_kwargs['latent_channels']}"
        )
    meta_path = folder / "configs" / "metadata.json"
    if meta_path.is_file():
        try:
            declared = json.loads(meta_path.read_text())["network_data_format"]["outputs"]["pred"]["spatial_shape"]
        except (KeyError, TypeError, json.JSONDecodeError):
            declared = None
        if declared is not None and tuple(int(s) for s in declared) != image_shape:
            raise CheckpointError(
                f"{meta_path}: output spatial_shape {declared} disagrees with the latent "
                f"{latent[1:]} x {f} = {image_shape} of inference.json"
            )

    sched = config.get("scheduler", {})
    if not str(sched.get("_target_", "")).endswith(("DDIMScheduler", "DDPMScheduler")):
        raise CheckpointError(f"{source}: scheduler._target_ {sched.get('_target_')!r} is not a DDIM/DDPM scheduler")
    noise = {k: v for k, v in sched.items() if not k.startswith("_")}
    steps = re.search(r"num_inference_steps\s*=\s*(\d+)", str(config.get("set_timesteps", "")))

    n_cond = len(COVARIATES)
    # the bundle concatenates the covariates to the latent and also attends to them
    concat = int(unet_kwargs.get("in_channels", 0)) == int(ae_kwargs.get("latent_channels", 0)) + n_cond
    ae, unet = assemble(ae_kwargs, unet_kwargs, concat, str(source))

    layouts = {
        "autoencoder": load_monai_weights(ae, load_torch_file(ae_file), ae_file),
        "unet": load_monai_weights(unet.unet, load_torch_file(unet_file), unet_file),
    }
    return LatentDiffusionModel(
        autoencoder=ae,
        unet=unet,
        autoencoder_kwargs=ae_kwargs,
        unet_kwargs=unet_kwargs,
        noise=noise,
        scale_factor=float(config.get("scale_factor", 1.0)),
        image_shape=image_shape,
        spacing=BUNDLE_SPACING,
        covariates=CovariateSpace.identity(),
        covariate_table=None,
        default_ddim_steps=int(steps.group(1)) if steps else 50,
        source=str(folder.resolve()),
        extra={"bundle": True, "weight_layout": layouts},
    ).eval()
