"""Configs: dataclass defaults ⊕ YAML file ⊕ ``key=value`` overrides (OmegaConf), resolved and saved with the run.

The schema is a dataclass (typed fields, one comment per field), so a wrong key or a value of the wrong type is an
error naming the key, raised before any work starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError
from common.io import atomic_write_text


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except TypeError as e:  # e.g. merging a mapping into a list
        raise ConfigError(f"{source}: a value does not fit the config's structure: {e}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f"key '{key}'" if key else "a key"
        raise ConfigError(f"{source}: {where} is not valid: {e.msg if hasattr(e, 'msg') else e}") from None


def _open_mappings(node: DictConfig) -> None:
    """Struct mode closes every node; free-form mappings (fields typed ``dict[...]`` or ``Any``, such as a
    backbone's kwargs) must take new keys, so only the dataclass-typed nodes stay closed."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (dict, None):
                OmegaConf.set_struct(child, False)
            else:
                _open_mappings(child)


def _yaml_where(e: Exception) -> str:
    """`` at line L, column C: problem`` from a PyYAML error, on one line (CLIs print one line)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else f": {problem}"


def load_config(schema: type | Any, file: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults from ``schema`` (a dataclass type or instance), then the YAML ``file``, then ``key=value`` overrides.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and where it came from;
    fields typed as plain mappings (``dict[str, Any]``) accept any key.
    """
    cfg = schema if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_mappings(cfg)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML{_yaml_where(e)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        cfg = _merge(cfg, loaded, str(path))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "command line")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {e}") from None
    return cfg


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None = None, dest: str = "overrides"
) -> argparse.Namespace:
    """``parser.parse_args``, but ``key=value`` overrides may also follow option flags (``--output O lr=1``):
    argparse gives a ``nargs="*"`` positional only the words before the first option."""
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("-") or "=" not in word or not hasattr(args, dest)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setattr(args, dest, list(getattr(args, dest, None) or []) + rest)
    return args


def to_object(cfg: DictConfig) -> Any:
    """The config as its schema's dataclass instance (typed attribute access)."""
    return OmegaConf.to_object(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    text = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg), resolve=True)
    return atomic_write_text(path, text)
