"""Configs: dataclass defaults ⊕ YAML file ⊕ ``key=value`` overrides (OmegaConf), resolved and saved with the run.

The schema is a dataclass (typed fields, one comment per field), so a wrong key or a value of the wrong type is an
error naming the key, raised before any work starts. Values are literal: OmegaConf's ``${...}`` interpolation is
escaped away, because a user's path may contain ``${`` and must arrive as typed. A key that was renamed stays
readable: a dataclass lists its old keys in ``__renamed__`` (``{"old.key": "new.key"}``, relative to it, or
``("new.key", convert)`` where the value's meaning changed too), and a file or override that uses one is read as the
new key, with a one-line deprecation warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

from common.errors import ConfigError
from common.io import atomic_write_text

log = logging.getLogger(__name__)

_NOT_GIVEN = object()
_ESCAPE = re.compile(r"(\\*)\$\{")  # OmegaConf: k backslashes + ``\${`` -> k/2 backslashes + a literal ``${``
_UNESCAPE = re.compile(r"\\((?:\\\\)*)\$\{")
_WORDS = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false", StringNode: "a string"}


def _literal(value: Any) -> Any:
    """``value`` with every string escaped so that OmegaConf reads ``${...}`` in it as text."""
    if isinstance(value, str):
        return _ESCAPE.sub(lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, Mapping):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    return value


def _unescaped(value: Any) -> Any:
    """The text ``_literal`` escaped (what a config node reads as)."""
    if isinstance(value, str):
        return _UNESCAPE.sub(lambda m: m.group(1)[: len(m.group(1)) // 2] + "${", value)
    if isinstance(value, Mapping):
        return {k: _unescaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescaped(v) for v in value]
    return value


def _escape_nodes(node: DictConfig | ListConfig) -> None:
    """Escape the strings already in a config built from a dataclass instance (its paths are literal too)."""
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            if not child._is_none() and not child._is_missing():
                _escape_nodes(child)
        elif isinstance(child._value(), str) and "${" in child._value():
            node[key] = _literal(child._value())


def _node_at(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or part not in node:
            return None
        node = node._get_node(part)
    return node


def _value_at(container: Any, key: str) -> Any:
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(container, Mapping) and part in container:
            container = container[part]
        elif isinstance(container, list) and part.isdigit() and int(part) < len(container):
            container = container[int(part)]
        else:
            return _NOT_GIVEN
    return container


def _expects(node: Any) -> str | None:
    """What a config node takes, in words, or None if it takes anything."""
    if isinstance(node, DictConfig):
        kind = node._metadata.ref_type if dataclasses.is_dataclass(node._metadata.ref_type) else None
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(kind))}" if kind else "a mapping"
    if isinstance(node, ListConfig):
        item = node._metadata.element_type
        return f"a list of {item.__name__}" if isinstance(item, type) and item is not Any else "a list"
    if isinstance(node, EnumNode):
        return "one of " + ", ".join(m.name for m in node.enum_type)
    return _WORDS.get(type(node))


def _error(source: str, e: Exception, cfg: DictConfig, key: str | None, given: Any) -> ConfigError:
    """One line naming the key and what it takes, for OmegaConf's multi-line errors."""
    problem = " ".join((str(e).splitlines() or [""])[0].split()) or type(e).__name__
    if not key:
        return ConfigError(f"{source}: a value does not fit the config's structure: {problem}")
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        node = _node_at(cfg, parent) if parent else cfg
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        where = f"under '{parent}'" if parent else "at the top level"
        hint = f"did you mean '{close[0]}'?" if close else f"the keys {where} are {', '.join(known)}"
        return ConfigError(f"{source}: unknown key '{key}'; {hint}")
    key = re.sub(r"(\[\d+\])+$", "", key)  # an item of a list: say what the list takes
    node = _node_at(cfg, key)
    expected = _expects(node)
    if expected is None:
        return ConfigError(f"{source}: key '{key}' is not valid: {problem}")
    got = _value_at(given, key)
    shown = f", got {got!r}" if got is not _NOT_GIVEN else f" ({problem})"
    if isinstance(node, StringNode) and isinstance(got, (Mapping, list)):
        shown += "; quote the value (YAML reads 'a: b' as a mapping and '[a]' as a list)"
    return ConfigError(f"{source}: key '{key}' expects {expected}{shown}")


def _pop_dotted(data: dict, key: str) -> Any:
    """Remove ``key`` (dotted) from ``data`` and return its value; a mapping it leaves empty goes too."""
    *parents, leaf = key.split(".")
    chain = [data]
    for part in parents:
        if not isinstance(chain[-1].get(part), dict):
            return _NOT_GIVEN
        chain.append(chain[-1][part])
    value = chain[-1].pop(leaf, _NOT_GIVEN)
    for part, parent, child in reversed(list(zip(parents, chain, chain[1:]))):
        if not child:
            del parent[part]
    return value


def _renamed(node: DictConfig, data: Any, source: str, where: str = "") -> Any:
    """``data`` (plain values meant for ``node``) with every key its schemas list in ``__renamed__`` moved to the
    new key (its value converted where the entry says how), warning once per key; both the old and the new key
    given is an error (which one would win?), unless they say the same (two old keys of one new key, as a saved
    config may hold)."""
    if not isinstance(data, dict) or not isinstance(node, DictConfig):
        return data
    data = dict(data)
    for old, new in getattr(node._metadata.object_type, "__renamed__", {}).items():
        new, convert = new if isinstance(new, tuple) else (new, None)
        value = _pop_dotted(data, old)
        if value is _NOT_GIVEN:
            continue
        value = convert(value) if convert else value
        if _value_at(data, new) not in (_NOT_GIVEN, value):
            raise ConfigError(f"{source}: both '{where}{old}' and its new name '{where}{new}' are set; keep '{new}'")
        shown = f" = {value}" if convert else ""
        log.warning("%s: '%s%s' is deprecated; it now reads '%s%s'%s", source, where, old, where, new, shown)
        target = data
        *parents, leaf = new.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    for key, value in data.items():
        child = node._get_node(key) if key in node else None
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            data[key] = _renamed(child, value, source, f"{where}{key}.")
        elif isinstance(child, DictConfig) and isinstance(value, dict):  # a None-defaulted dataclass field
            kind = child._metadata.ref_type
            if dataclasses.is_dataclass(kind):
                data[key] = _renamed(OmegaConf.structured(kind), value, source, f"{where}{key}.")
    return data


def _merge(cfg: DictConfig, other: dict, source: str, key: str | None = None) -> DictConfig:
    """``cfg`` ⊕ ``other`` (plain values, merged as literal text); a misfit is a one-line ``ConfigError``."""
    try:
        return OmegaConf.merge(cfg, _literal(other))
    except (OmegaConfBaseException, TypeError) as e:  # TypeError: e.g. merging a mapping into a list
        named = getattr(e, "full_key", None) or getattr(e, "key", None) or key
        if not named and len(other) > 1:  # OmegaConf did not say where: merge key by key to find out
            for k, v in other.items():
                _merge(cfg, {k: v}, source)
        raise _error(source, e, cfg, str(named or next(iter(other), "")) or None, other) from None


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


def _override(cfg: DictConfig, item: str) -> tuple[str, dict]:
    """``key=value`` -> (key, nested mapping); the value is read as YAML, except that a string field takes
    the text as typed (``init=monai:`` is the string ``monai:``, not a mapping)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    string_field = isinstance(_node_at(cfg, key), StringNode)
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except Exception as e:  # yaml.YAMLError
        if not string_field:
            raise ConfigError(f"override {item!r}: the value is not valid YAML{_yaml_where(e)}") from None
        value = text
    if string_field and value is not None and not isinstance(value, str):
        value = text
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return key, nested


def load_config(schema: type | Any, file: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults from ``schema`` (a dataclass type or instance), then the YAML ``file``, then ``key=value`` overrides.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key, what it takes and where
    the value came from; fields typed as plain mappings (``dict[str, Any]``) accept any key. Strings are literal.
    """
    if isinstance(schema, DictConfig):
        cfg = schema
    else:
        cfg = OmegaConf.structured(schema)
        _escape_nodes(cfg)
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
        cfg = _merge(cfg, _renamed(cfg, OmegaConf.to_container(loaded), str(path)), str(path))
    overrides = list(overrides)
    parsed = [_override(cfg, item) for item in overrides]
    for key, nested in parsed:
        cfg = _merge(cfg, _renamed(cfg, nested, "command line"), "command line", key)
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
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # e.g. a mandatory ``???`` value never given
        raise _error("config", e, cfg, getattr(e, "full_key", None), _NOT_GIVEN) from None


def config_values(cfg: Any) -> dict:
    """The config (``load_config``'s result or a schema instance) as plain values, strings as the run read them."""
    if isinstance(cfg, DictConfig):  # escaped by load_config: the text the nodes read as
        return _unescaped(OmegaConf.to_container(cfg, enum_to_str=True))
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # a dataclass: strings literal


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the config as YAML, atomically (a reader never sees half a file); strings as the run read them."""
    return atomic_write_text(path, OmegaConf.to_yaml(config_values(cfg)))
