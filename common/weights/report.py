"""What a weight import did, key by key: loaded, resized, inflated, missing, unexpected."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LoadReport:
    """The outcome of ``load_backbone``; ``resized`` and ``inflated`` map a key to what was done to it."""

    init: str  # the init spec as given ("scratch", "timm2d:/x.pth", ...)
    source: str | None = None  # the file or folder the weights came from
    loaded: list[str] = field(default_factory=list)  # model keys filled from the source (incl. adapted ones)
    resized: dict[str, str] = field(default_factory=dict)  # key -> "(old) -> (new)" for resampled tensors
    inflated: dict[str, str] = field(default_factory=dict)  # key -> "2D (..) -> 3D (..)" for 2D->3D kernels
    missing: list[str] = field(default_factory=list)  # model keys the source does not have (left as built)
    unexpected: list[str] = field(default_factory=list)  # source keys the model has no place for (ignored)
    notes: list[str] = field(default_factory=list)  # source-specific facts (a norm eps that differs, zero biases)

    def summary(self) -> str:
        """One paragraph for a log: counts, then the adapted / missing / unexpected keys by name."""
        head = f"init {self.init}: loaded {len(self.loaded)} tensors"
        if self.source:
            head += f" from {self.source}"
        parts = [head]
        if self.inflated:
            done = [f"{k} {v}" for k, v in self.inflated.items()]
            parts.append(f"inflated {len(done)}: {shortened(done)}")
        if self.resized:
            done = [f"{k} {v}" for k, v in self.resized.items()]
            parts.append(f"resized {len(done)}: {shortened(done)}")
        if self.missing:
            parts.append(f"missing {len(self.missing)} (kept as initialised): {shortened(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} (ignored): {shortened(self.unexpected)}")
        parts.extend(self.notes)
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def shortened(items: list[str], limit: int = 6) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
