"""LoRA fine-tuning through ``peft``: low-rank updates on the frozen backbone's projections, with the head and
the norms trained; the training loop is full fine-tuning's, over the parameters left trainable.

ViTs adapt ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (Hu et al. 2021 adapted attention; QLoRA
showed the MLPs matter as much); CNNs adapt every ``Conv3d`` (peft's ``lora.Conv3d``: a k³ down-projection to
``rank`` channels, then a 1³ up-projection). Per fold only what was trained is written:
``OUT/adapters/foldK.safetensors`` holds the adapters, the norms (with their running statistics) and the head.
Then the adapters are merged into the weights they adapt (``merge_lora``): the fold's predictions and its model
folder (``finetune.model_folder``) come from the same plain backbone, which loads without peft. In bf16 the
adapters and the head train as full fine-tuning's weights do (bf16, with fp32 masters; the norms in fp32); the
frozen weights stay fp32, so that merging adds the adapters' small update to them without rounding it away.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from common.errors import CheckpointError, ConfigError
from common.io import atomic_write
from common.torchvision_ops import import_torchvision_without_ops
from finetune.heads import FineTuneModel
from finetune.modes.common import FoldInputs
from finetune.modes.full import fit_predict_full

log = logging.getLogger(__name__)

VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
CNN_TARGETS = ("Conv3d",)
LAYER_TYPES = {"Linear": nn.Linear, "Conv3d": nn.Conv3d}  # a target naming a type means every module of it
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)  # batch and instance norms


def import_peft():
    """``peft`` (imported on use: it pulls in ``transformers``, which no other mode needs, and through it
    torchvision: see ``common.torchvision_ops``)."""
    import_torchvision_without_ops()
    import peft

    return peft


def target_modules(backbone: nn.Module, targets: list[str]) -> list[str]:
    """Full module names to adapt: the configured suffixes / layer types, or the backbone's default."""
    wanted = list(targets) or list(VIT_TARGETS if hasattr(backbone, "blocks") else CNN_TARGETS)
    names = []
    for name, module in backbone.named_modules():
        for target in wanted:
            kind = LAYER_TYPES.get(target)
            if (kind is not None and isinstance(module, kind)) or name == target or name.endswith("." + target):
                names.append(name)
                break
    if not names:
        raise ConfigError(
            f"train.lora.targets {wanted} match no module of the {type(backbone).__name__}; give module-name "
            "suffixes (attn.qkv, mlp.fc1, layer1.0.conv1) or a layer type (Linear, Conv3d)"
        )
    return names


def add_lora(backbone: nn.Module, settings) -> nn.Module:
    """Inject LoRA adapters into ``backbone`` in place (names unchanged but for the adapted layers, so layer-wise
    lr decay still reads block numbers); freeze the rest but the norms."""
    peft = import_peft()
    if settings.rank < 1 or settings.alpha <= 0 or not 0.0 <= settings.dropout < 1.0:
        raise ConfigError(
            f"train.lora needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank {settings.rank}, "
            f"alpha {settings.alpha}, dropout {settings.dropout}"
        )
    names = target_modules(backbone, settings.targets)
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names
    )
    try:
        backbone = peft.inject_adapter_in_model(config, backbone)
    except ValueError as e:  # a module type peft's LoRA has no layer for
        raise ConfigError(
            f"peft {peft.__version__} cannot put LoRA on a target of the {type(backbone).__name__} ({e}); "
            "choose train.lora.targets among its Linear / Conv1d-3d / Embedding modules"
        ) from None
    for module in backbone.modules():
        if isinstance(module, NORMS):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return backbone


def _count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_counts(model: nn.Module) -> dict:
    """Trainable parameters of a LoRA'd ``FineTuneModel`` against the backbone it adapts (adapters excluded)."""
    backbone = model.backbone
    base = _count(p for n, p in backbone.named_parameters() if "lora_" not in n)
    trainable_backbone = _count(p for p in backbone.parameters() if p.requires_grad)
    head = _count(p for p in model.head.parameters() if p.requires_grad)
    return {
        "backbone_params": base,
        "trainable_backbone_params": trainable_backbone,
        "trainable_head_params": head,
        "trainable_fraction": (trainable_backbone + head) / base,
    }


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA changed: trainable parameters, plus every norm's buffers (BatchNorm running statistics move in
    training although its frozen neighbours do not)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if isinstance(module, NORMS):
            for n, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    state[f"{prefix}.{n}"] = b.detach()
    return {k: v.to("cpu", copy=True).contiguous() for k, v in state.items()}


def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold every LoRA update into the layer it adapts (W + B·A·alpha/rank) and put the plain layer back in its
    place: the backbone's keys are the unadapted model's again. In place; returns ``backbone``."""
    from peft.tuners.lora import LoraLayer  # peft is imported on use (import_peft)

    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())
    return backbone


def load_fold(path: str | Path, backbone: nn.Module, head_dropout: float = 0.0, head_norm: str = "batch") -> nn.Module:
    """A trained fold back from ``adapters/foldK.safetensors``: ``backbone`` is the cell's initialised backbone
    (same init), which gets the saved adapters, norms and head; returns the ``FineTuneModel`` in eval mode."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["lora"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a LoRA fold written by finetune's lora mode ({e})") from e
    settings = SimpleNamespace(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"], targets=meta["targets"])
    model = FineTuneModel(add_lora(backbone, settings), state["head.fc.weight"].shape[0], head_dropout, head_norm)
    own = model.state_dict()
    absent = sorted(set(state) - set(own))
    if absent:
        raise CheckpointError(f"{path}: tensors the rebuilt model lacks ({', '.join(absent[:6])}); another backbone?")
    model.load_state_dict({**own, **state})
    return model.eval()


def fit_predict_lora(inputs: FoldInputs, cfg, optim) -> tuple[np.ndarray, np.ndarray, dict]:
    """Full fine-tuning's loop over the adapters, norms and head; writes ``adapters/foldK.safetensors``, merges
    the adapters and hands the model to ``inputs.on_fitted``."""
    counts: dict = {}
    targets: list[str] = []

    def make_backbone() -> nn.Module:
        backbone = inputs.make_backbone()
        targets[:] = target_modules(backbone, cfg.lora.targets)
        return add_lora(backbone, cfg.lora)

    def keep(model: nn.Module) -> None:
        counts.update(parameter_counts(model))
        if inputs.out_dir is not None:
            meta = {
                "rank": cfg.lora.rank,
                "alpha": cfg.lora.alpha,
                "dropout": cfg.lora.dropout,
                "targets": targets,
                "arch": getattr(model.backbone, "arch", None),
                "fold": inputs.fold,
                **counts,
            }
            path = Path(inputs.out_dir) / "adapters" / f"fold{inputs.fold}.safetensors"
            with atomic_write(path) as tmp:
                save_file(trained_state(model), tmp, metadata={"lora": json.dumps(meta, default=str)})
        merge_lora(model.backbone)
        if inputs.on_fitted is not None:
            inputs.on_fitted(model)

    lora_inputs = dataclasses.replace(inputs, make_backbone=make_backbone, on_fitted=keep)
    val_out, test_out, info = fit_predict_full(lora_inputs, cfg, optim)
    log.info(
        "LoRA fold %d: %d trainable of %d backbone parameters (%.2f %%, head included)",
        inputs.fold,
        counts["trainable_backbone_params"] + counts["trainable_head_params"],
        counts["backbone_params"],
        100 * counts["trainable_fraction"],
    )
    return val_out, test_out, {**info, **counts}
