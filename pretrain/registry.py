"""Names registered once, as timm's ``register_model`` does: a record per name, every list of names read off it.

``pretrain.objectives.OBJECTIVES`` and ``pretrain.corpora.CORPORA`` are registries. Each objective or corpus is
registered with its builder, the covariates it needs or gives and the model card's words for it; the config's
checks, the CLI's ``--corpus`` choices and the export's card all read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from common.errors import ConfigError

Record = TypeVar("Record")
Builder = TypeVar("Builder", bound=Callable[..., Any])


class Registry(Generic[Record]):
    """Names to records, in registration order; ``key`` is the config key that names one (errors say it)."""

    def __init__(self, key: str, record: Callable[..., Record]):
        self.key = key
        self._record = record
        self._records: dict[str, Record] = {}

    def register(self, name: str, **fields: Any) -> Callable[[Builder], Builder]:
        """Decorator registering ``build`` as ``name``, its record ``record(build=build, **fields)``."""

        def decorate(build: Builder) -> Builder:
            if name in self._records:
                raise ValueError(f"{self.key} {name!r} is already registered")
            self._records[name] = self._record(build=build, **fields)
            return build

        return decorate

    def __getitem__(self, name: str) -> Record:
        if name not in self._records:
            raise ConfigError(f"{self.key} must be one of {tuple(self)}, got {name!r}")
        return self._records[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)
