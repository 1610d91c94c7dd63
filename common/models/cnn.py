"""MONAI's 3D CNNs behind the backbone interface, classifier removed.

The MONAI network is kept whole under ``net.`` so its key names are MONAI's: MedicalNet ResNet weights (as
MONAI loads them) map onto ``net.*`` unchanged. The ResNet defaults (shortcut type, downsample bias, stride-2
7³ stem) are MedicalNet's, so those weights fit without extra arguments. Every keyword argument is checked
before MONAI sees it: a bad one is a ``ConfigError`` naming the backbone and the argument.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from monai.networks.layers import get_act_layer, get_norm_layer
from monai.networks.nets import DenseNet, DenseNet121
from monai.networks.nets.resnet import (
    ResNet,
    ResNetBlock,
    ResNetBottleneck,
    get_inplanes,
    get_medicalnet_pretrained_resnet_args,
)
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.checkpoint import checkpoint

from common.errors import ConfigError
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
    """MONAI ``DenseNet121`` minus ``class_layers.out``; ``layer_id``: stem 0, block/transition k, norm5 last."""

    def __init__(self, net: nn.Module, img_size, in_chans: int, grad_checkpointing: bool):
        super().__init__(net, img_size, in_chans, grad_checkpointing)
        self.feature_dim = net.class_layers.out.in_features
        self.num_layers = sum(name.startswith("denseblock") for name, _ in net.features.named_children())
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


class _ResNet(ResNet):
    """MONAI's ``ResNet`` with ``norm`` and ``act`` in every block: MONAI 1.6's ``_make_layer`` does not pass them
    on, so a ResNet asked for group norm kept batch norm (and ReLU) in every block but the stem."""

    def __init__(self, block: type[nn.Module], layers: list[int], norm: Any = "batch", act: Any = None, **kwargs):
        self.block_layers = {"norm": norm, "act": act or ("relu", {"inplace": True})}  # read by _make_layer
        super().__init__(block, layers, get_inplanes(), norm=norm, act=self.block_layers["act"], **kwargs)

    def _make_layer(self, block, planes, blocks, spatial_dims, shortcut_type, stride=1, norm="batch"):
        with_act = partial(block, act=self.block_layers["act"])
        with_act.expansion = block.expansion  # what _make_layer reads off the block class
        norm = self.block_layers["norm"]
        return super()._make_layer(with_act, planes, blocks, spatial_dims, shortcut_type, stride, norm=norm)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _size(v: Any) -> bool:
    return _count(v) or (isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_count, v)))


_FLAG = (lambda v: isinstance(v, bool), "true or false")
_COUNT = (_count, "a positive integer")
# argument -> (accepts, what it takes): checked before MONAI's constructor, which fails deep inside on these
ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "shortcut_type": (lambda v: v in ("A", "B"), "'A' (identity, zero-padded) or 'B' (1x1 convolution)"),
    "bias_downsample": _FLAG,
    "no_max_pool": _FLAG,
    "conv1_t_size": (_size, "a positive integer or three of them (D, H, W)"),
    "conv1_t_stride": (_size, "a positive integer or three of them (D, H, W)"),
    "widen_factor": (lambda v: _number(v) and int(64 * v) >= 1, "a number >= 1/64 (the stem has 64 x it channels)"),
    "init_features": _COUNT,
    "growth_rate": _COUNT,
    "bn_size": _COUNT,
    "block_config": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_count, v)),
        "a list of positive integers (layers per dense block), e.g. [6, 12, 24, 16]",
    ),
    "dropout_prob": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
}
_LAYER_EXAMPLES = {"norm": "batch, group, instance", "act": "relu, gelu, prelu"}


def _check_args(name: str, kwargs: dict[str, Any]) -> None:
    """Known arguments of the right type and range, before MONAI's constructor fails deep inside on them."""
    for arg, value in kwargs.items():
        accepts, takes = ARG_CHECKS.get(arg, (None, ""))
        if accepts is not None and not accepts(value):
            raise ConfigError(f"backbone {name!r}: {arg} must be {takes}, got {value!r}")


def _norm_and_act(name: str, kwargs: dict[str, Any], channels: int, scaled_norm: bool) -> nn.Module | None:
    """Build ``norm`` / ``act`` once as MONAI will (a name, or [name, {arguments}]); returns the norm layer (None if
    not given). ``scaled_norm``: the network initialises every norm's weight, so the norm needs one."""
    layers = {}
    for arg, build in (("norm", partial(get_norm_layer, spatial_dims=3, channels=channels)), ("act", get_act_layer)):
        if arg in kwargs:
            try:
                layers[arg] = build(kwargs[arg])
            except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
                raise ConfigError(
                    f"backbone {name!r}: {arg}={kwargs[arg]!r} is not a layer MONAI can build ({_one_line(e)}); "
                    f"give a name ({_LAYER_EXAMPLES[arg]} ...) or [name, {{arguments}}]"
                ) from None
    norm = layers.get("norm")
    if scaled_norm and norm is not None and getattr(norm, "weight", None) is None:
        kind = kwargs["norm"] if isinstance(kwargs["norm"], str) else kwargs["norm"][0]
        fix = f"norm=[{kind}, {{affine: true}}]" if kind else "a norm with weights (batch, group ...)"
        raise ConfigError(
            f"backbone {name!r}: norm={kwargs['norm']!r} has no learnable scale, which MONAI's ResNet initialises; "
            f"use {fix}"
        )
    return norm


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_last_map(name: str, norm: nn.Module | None, kwargs: dict[str, Any], last_map: Sequence[int]) -> None:
    """Instance norm normalises each channel over its voxels: torch refuses a map of one voxel when training."""
    if isinstance(norm, _InstanceNorm) and math.prod(last_map) == 1:
        raise ConfigError(
            f"backbone {name!r}: norm={kwargs['norm']!r} normalises over the voxels of each feature map, and at this "
            f"img_size the last stage has one voxel {tuple(last_map)}; use a larger img_size or norm=batch / group"
        )


def _build(name: str, build: Callable[..., nn.Module], given: dict[str, Any], **kwargs: Any) -> nn.Module:
    """MONAI's constructor; what the checks above did not foresee still ends as one ConfigError line."""
    try:
        return build(**kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ConfigError(f"backbone {name!r}: MONAI cannot build it with {given} ({_one_line(e)})") from None


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


def _resnet_last_map(img_size: tuple[int, int, int], kw: dict[str, Any]) -> list[int]:
    """(D, H, W) of layer4's output: the stem, the max pool, then layer2..4 each halve (3³ kernels, padding 1)."""
    kernel, stride = (
        to_3tuple(kw.get("conv1_t_size", 7), "conv1_t_size"),
        to_3tuple(kw["conv1_t_stride"], "conv1_t_stride"),
    )
    sizes = [_out(d, k, s, k // 2) for d, k, s in zip(img_size, kernel, stride)]
    for _ in range(3 if kw.get("no_max_pool", False) else 4):
        sizes = [_out(d, 3, 2, 1) for d in sizes]
    return sizes


def _monai_defaults(constructor: Callable[..., Any], names: frozenset[str]) -> dict[str, Any]:
    """The defaults MONAI's ``constructor`` gives the arguments ``names`` (read from its signature, so they follow
    MONAI's version)."""
    params = inspect.signature(constructor).parameters
    return {k: params[k].default for k in sorted(names) if k in params}


def _register_resnet(name: str, depth: int, block: type[nn.Module], layers: list[int]) -> None:
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    medicalnet = {"shortcut_type": shortcut_type, "bias_downsample": bias_downsample, "conv1_t_stride": 2}
    defaults = {**_monai_defaults(ResNet.__init__, RESNET_ARGS), **medicalnet, "grad_checkpointing": False}

    @register_backbone(name, defaults)
    def factory(
        img_size: int | Sequence[int] = 96, in_chans: int = 1, grad_checkpointing: bool = False, **kwargs
    ) -> ResNet3D:
        check_kwargs(name, kwargs, RESNET_ARGS)
        kw = {**medicalnet, **kwargs}
        _check_args(name, kwargs)
        norm = _norm_and_act(name, kwargs, int(64 * kw.get("widen_factor", 1.0)), scaled_norm=True)
        _check_last_map(name, norm, kwargs, _resnet_last_map(to_3tuple(img_size, "img_size"), kw))
        build = partial(_ResNet, block, layers, spatial_dims=3, n_input_channels=in_chans, feed_forward=False)
        return ResNet3D(_build(name, build, kwargs, **kw), img_size, in_chans, grad_checkpointing)


_register_resnet("resnet18", 18, ResNetBlock, [2, 2, 2, 2])
_register_resnet("resnet50", 50, ResNetBottleneck, [3, 4, 6, 3])


@register_backbone(
    "densenet121",
    {**_monai_defaults(DenseNet.__init__, DENSENET_ARGS), "grad_checkpointing": False},
)
def densenet121(
    img_size: int | Sequence[int] = 96, in_chans: int = 1, grad_checkpointing: bool = False, **kwargs
) -> DenseNet3D:
    check_kwargs("densenet121", kwargs, DENSENET_ARGS)
    _check_args("densenet121", kwargs)
    norm = _norm_and_act("densenet121", kwargs, kwargs.get("init_features", 64), scaled_norm=False)
    # the stem (7³ stride-2 conv, 3³ stride-2 max pool), then a 2x average pool in each transition
    sizes = [_out(_out(d, 7, 2, 3), 3, 2, 1) for d in to_3tuple(img_size, "img_size")]
    for _ in range(len(kwargs.get("block_config", (6, 12, 24, 16))) - 1):
        sizes = [d // 2 for d in sizes]
    _check_last_map("densenet121", norm, kwargs, sizes)
    # out_channels only sizes the classifier, which the wrapper removes
    net = _build("densenet121", DenseNet121, kwargs, spatial_dims=3, in_channels=in_chans, out_channels=1, **kwargs)
    return DenseNet3D(net, img_size, in_chans, grad_checkpointing)
