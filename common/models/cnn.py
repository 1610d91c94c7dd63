"""MONAI's 3D CNNs behind the backbone interface, classifier removed.

The MONAI network is kept whole under ``net.`` so its key names are MONAI's: MedicalNet ResNet weights (as
MONAI loads them) map onto ``net.*`` unchanged. The ResNet defaults (shortcut type, downsample bias, stride-2
7³ stem) are MedicalNet's, so those weights fit without extra arguments.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DenseNet121, resnet18, resnet50
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from common.models.registry import check_kwargs, register_backbone
from common.models.vit import to_3tuple


class _KeepBatchNormStats:
    """Restores BatchNorm running statistics on exit: a checkpoint recompute must not count a batch twice."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def __enter__(self) -> None:
        self.saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in self.norms]

    def __exit__(self, *exc) -> None:
        for m, saved in zip(self.norms, self.saved):
            for buf, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                buf.copy_(value)


class MonaiCNN(nn.Module):
    """Shared interface of the wrappers: input check, checkpointed stages, optimiser helpers."""

    feature_dim: int
    num_layers: int = 4

    def __init__(self, net: nn.Module, img_size: int | Sequence[int], in_chans: int, grad_checkpointing: bool):
        super().__init__()
        self.net = net
        self.img_size = to_3tuple(img_size, "img_size")  # recorded for metadata; CNNs take any input size
        self.in_chans = in_chans
        self.grad_checkpointing = grad_checkpointing
        self.arch: dict | None = None  # set by create_backbone

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects input (B, {self.in_chans}, D, H, W), got {tuple(x.shape)}")

    def _stage(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            contexts = lambda: (contextlib.nullcontext(), _KeepBatchNormStats(module))
            return checkpoint(module, x, use_reentrant=False, context_fn=contexts)
        return module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def no_weight_decay(self) -> set[str]:
        """No names: CNN norms and biases are 1-D and optimiser builders exclude those by shape."""
        return set()


class ResNet3D(MonaiCNN):
    """MONAI ``ResNet`` (3D, no ``fc``); ``layer_id``: stem 0, ``layer{k}`` k."""

    def __init__(self, net: nn.Module, img_size, in_chans: int, grad_checkpointing: bool):
        super().__init__(net, img_size, in_chans, grad_checkpointing)
        self.feature_dim = net.in_planes  # channels out of layer4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, feature_dim)."""
        self._check_input(x)
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))  # (B, 64, D/2, H/2, W/2) with the default stride-2 stem
        if not n.no_max_pool:
            x = n.maxpool(x)
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = self._stage(layer, x)
        return n.avgpool(x).flatten(1)  # (B, feature_dim, d, h, w) -> (B, feature_dim)

    def layer_id(self, name: str) -> int:
        match = re.match(r"net\.layer(\d)\.", name)
        if match:
            return int(match.group(1))
        return 0 if name.startswith(("net.conv1.", "net.bn1.")) else self.num_layers + 1


class DenseNet3D(MonaiCNN):
    """MONAI ``DenseNet121`` minus ``class_layers.out``; ``layer_id``: stem 0, block/transition k, norm5 5."""

    def __init__(self, net: nn.Module, img_size, in_chans: int, grad_checkpointing: bool):
        super().__init__(net, img_size, in_chans, grad_checkpointing)
        self.feature_dim = net.class_layers.out.in_features
        del net.class_layers.out  # the classifier; relu -> global pool -> flatten stay

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, feature_dim)."""
        self._check_input(x)
        for name, module in self.net.features.named_children():
            x = self._stage(module, x) if name.startswith(("denseblock", "transition")) else module(x)
        return self.net.class_layers(x)  # (B, feature_dim, d, h, w) -> (B, feature_dim)

    def layer_id(self, name: str) -> int:
        match = re.match(r"net\.features\.(?:denseblock|transition)(\d)\.", name)
        if match:
            return int(match.group(1))
        if name.startswith("net.features.norm5."):
            return self.num_layers + 1
        return 0 if name.startswith("net.features.") else self.num_layers + 1


RESNET_ARGS = frozenset(
    {
        "shortcut_type",
        "bias_downsample",
        "conv1_t_size",
        "conv1_t_stride",
        "no_max_pool",
        "widen_factor",
        "act",
        "norm",
        "grad_checkpointing",
    }
)
DENSENET_ARGS = frozenset(
    {
        "init_features",
        "growth_rate",
        "block_config",
        "bn_size",
        "act",
        "norm",
        "dropout_prob",
        "grad_checkpointing",
    }
)


def _register_resnet(name: str, depth: int, build) -> None:
    @register_backbone(name)
    def factory(
        img_size: int | Sequence[int] = 96, in_chans: int = 1, grad_checkpointing: bool = False, **kwargs
    ) -> ResNet3D:
        check_kwargs(name, kwargs, RESNET_ARGS)
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        defaults = {"shortcut_type": shortcut_type, "bias_downsample": bias_downsample, "conv1_t_stride": 2}
        net = build(spatial_dims=3, n_input_channels=in_chans, feed_forward=False, **{**defaults, **kwargs})
        return ResNet3D(net, img_size, in_chans, grad_checkpointing)


_register_resnet("resnet18", 18, resnet18)
_register_resnet("resnet50", 50, resnet50)


@register_backbone("densenet121")
def densenet121(
    img_size: int | Sequence[int] = 96, in_chans: int = 1, grad_checkpointing: bool = False, **kwargs
) -> DenseNet3D:
    check_kwargs("densenet121", kwargs, DENSENET_ARGS)
    # out_channels only sizes the classifier, which the wrapper removes
    net = DenseNet121(spatial_dims=3, in_channels=in_chans, out_channels=1, **kwargs)
    return DenseNet3D(net, img_size, in_chans, grad_checkpointing)
