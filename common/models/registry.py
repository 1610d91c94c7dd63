"""The one backbone registry: names to factories, and the ``arch`` record that rebuilds a model.

Model files register their factories with ``@register_backbone(name, defaults)``; importing ``common.models``
imports them all, so ``create_backbone`` sees every name. ``defaults`` are the values a factory uses for the
arguments it is not given: ``arch`` records them too, so an export names every constructor argument and a reader
of its ``config.json`` needs neither this registry's version nor its source to know the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn as nn

from common.errors import ConfigError, NeurotransferError

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[Factory, dict[str, Any]]] = {}  # name -> (factory, its defaults)
# Constructor arguments that change how a model runs or trains (memory, kernels, regularisation), not the function
# its weights compute in eval mode: a fine-tune may choose them afresh without contradicting the export it loads.
RUNTIME_ARGS = frozenset(
    {"grad_checkpointing", "attn_backend", "drop_path_rate", "attn_drop", "proj_drop", "dropout_prob"}
)


def register_backbone(name: str, defaults: Mapping[str, Any]) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(img_size, in_chans, **kwargs) -> nn.Module`` under ``name``; ``defaults``
    holds every other keyword argument the factory takes, with the value it uses when the argument is not given."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered (by {_REGISTRY[name][0].__module__})")
        _REGISTRY[name] = (factory, _json_ready(_plain(dict(defaults))))
        return factory

    return decorate


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def _json_ready(value: Any) -> Any:
    """Tuples as lists, so ``arch`` survives a JSON round trip (checkpoint metadata) unchanged."""
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """A config's containers (OmegaConf's ``DictConfig`` / ``ListConfig``) as dicts and lists: MONAI's layer
    factories take ``norm=[name, {arguments}]`` only if the arguments are a ``dict``."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _known(name: str) -> tuple[Factory, dict[str, Any]]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name]


def backbone_kwargs(name: str, img_size: int | Sequence[int] = 96, in_chans: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Every constructor argument of backbone ``name`` built with these: the given ones over the registered
    defaults (tuples as lists, JSON-ready). What ``arch["kwargs"]`` records; computed without building."""
    _, defaults = _known(name)
    return _json_ready({"img_size": _plain(img_size), "in_chans": in_chans, **defaults, **_plain(kwargs)})


def create_backbone(name: str, img_size: int | Sequence[int] = 96, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` for ``img_size`` (int or (D, H, W)) volumes with ``in_chans`` channels.

    The model's ``arch`` attribute records ``{"name": name, "kwargs": backbone_kwargs(...)}``: every constructor
    argument, defaults included, so that ``create_backbone(arch["name"], **arch["kwargs"])`` rebuilds the same
    architecture. Arguments the backbone refuses raise ``ConfigError`` naming it.
    """
    factory, _ = _known(name)
    img_size, kwargs = _plain(img_size), _plain(kwargs)
    try:
        model = factory(img_size=img_size, in_chans=in_chans, **kwargs)
    except NeurotransferError:
        raise
    except (ValueError, TypeError) as e:  # a constructor refusing a keyword argument: the user's to fix
        raise ConfigError(f"backbone {name!r} cannot be built with {kwargs}: {' '.join(str(e).split())}") from None
    model.arch = {"name": name, "kwargs": backbone_kwargs(name, img_size, in_chans, **kwargs)}
    return model


def check_kwargs(name: str, kwargs: dict[str, Any], accepted: frozenset[str]) -> None:
    """Raise a ConfigError naming the backbone when ``kwargs`` has keys its factory does not take."""
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"backbone {name!r} got unknown keyword argument(s) {unknown}; it accepts {sorted(accepted)}")
