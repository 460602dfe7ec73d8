"""A run directory: manifest, metrics and per-stage caching, all written atomically.

``manifest.json`` records the config, model identity, package versions and, per stage, the key
of its inputs and its wall time; a stage whose key is unchanged and whose outputs exist is
skipped on the next run. ``metrics.json`` is the nested metrics object of ../METRICS.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("saefeatures", "torch", "transformer-lens", "sae-lens", "transformers", "numpy", "wandb")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_default).encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def set_nested(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


@dataclass
class RunDir:
    """The run directory of one study, with its manifest and metrics."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path | str) -> "RunDir":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        for name in ("manifest", "metrics"):
            f = path / f"{name}.json"
            if f.exists():
                setattr(run, name, json.loads(f.read_text()))
        run.manifest.setdefault("stages", {})
        return run

    def save(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)
        write_json(self.path / "metrics.json", self.metrics)

    def record(self, section: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into metrics under the dotted ``section`` and save."""
        for k, v in values.items():
            set_nested(self.metrics, f"{section}.{k}" if section else k, v)
        self.save()

    def is_done(self, stage: str, key: str, outputs: tuple[Path, ...] = ()) -> bool:
        entry = self.manifest["stages"].get(stage, {})
        return entry.get("key") == key and entry.get("done", False) and all(p.exists() for p in outputs)

    @contextmanager
    def stage(self, name: str, key: str = ""):
        """Time a stage and mark it done with its input key when the block completes."""
        t0 = time.perf_counter()
        self.manifest["stages"][name] = {"key": key, "done": False}
        yield
        seconds = time.perf_counter() - t0
        self.manifest["stages"][name] = {"key": key, "done": True, "seconds": round(seconds, 2)}
        set_nested(self.metrics, f"timings.{name}_s", round(seconds, 2))
        self.save()

    def cached(self, name: str, key: str, outputs: tuple[Path, ...], build: Callable[[], None]) -> bool:
        """Run ``build`` unless the stage is done with the same key and its outputs exist.
        Returns True when it ran."""
        if self.is_done(name, key, outputs):
            return False
        with self.stage(name, key):
            build()
        return True
