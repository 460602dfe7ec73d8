"""What the stages of a run share: the `Study` (config, run directory, model, layer, corpus) and the
keys and file helpers every stage uses to skip work whose inputs did not change."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..activations import model_key, pooling_meta
from ..directions import EmotionDirections
from ..distributed import World
from ..hook_names import hook_name
from ..keys import key_of
from .config import RunConfig
from .rundir import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Study:
    """What the stages share while a run is in progress."""

    cfg: RunConfig
    run: RunDir
    model: Any
    layer: int
    records: list
    corpus_key: str
    """Hash of the corpus file's content."""
    world: World = field(default_factory=World)
    """The run's processes under `torchrun` (rank 0 writes the run directory); one by default."""

    @property
    def hook(self) -> str:
        return hook_name(self.layer, self.cfg.activations.hook)

    @property
    def layers(self) -> list[int]:
        """Layers pooled: the run's layer plus ``activations.layers`` (the report's layer sweep)."""
        return sorted({self.layer, *self.cfg.activations.layers})

    @property
    def hooks(self) -> list[str]:
        return [hook_name(layer, self.cfg.activations.hook) for layer in self.layers]

    @property
    def model_key(self) -> dict:
        return model_key(self.model)

    def key(self, stage: str) -> str | None:
        """The input key a stage last ran with (what downstream keys build on)."""
        return self.run.manifest["stages"].get(stage, {}).get("key")


def reuse_together(study: Study, stage: str, key: str, load: Callable[[], T],
                   others: Callable[[], T] | None = None) -> T | None:
    """`RunDir.reuse` for a stage every rank runs, decided by rank 0 (which may have spent a while on
    stages of its own since the last exchange): the other ranks compute with it, or, when it reuses
    the outputs, take ``others()`` (default ``load()``)."""
    world = study.world
    found = study.run.reuse(stage, key, load) if world.leader else None
    if not world.agree(stage, found is not None, timeout_s=world.wait_s) or world.leader:
        return found
    return (others or load)()


def directions_key(dirs: EmotionDirections) -> str:
    """Everything directions are: names, vectors, centre, hook and latents."""
    return key_of(dirs.names, dirs.layer, dirs.hook, dirs.vectors, dirs.center, dirs.latents, dirs.recipe)


def fresh_dir(path: Path) -> Path:
    """``path`` emptied (a recomputed stage's figures replace, not join, the old ones)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def exists_or_raise(*paths: Path) -> bool:
    """True, or FileNotFoundError naming the first missing file (a `RunDir.reuse` loader)."""
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing")
    return True


def pooling(study: Study, hooks: list[str] | None = None) -> dict:
    """How the run pools activations at ``hooks`` (default: every pooled layer's): model, hooks, dtype,
    truncation (`activations.pooling_meta`)."""
    return pooling_meta(study.model, hooks or study.hooks, study.cfg.activations)


def activations_dir(study: Study, name: str = "corpus") -> Path:
    """Where pooled activations go: one directory per model and pooling setting, so a changed
    config pools afresh beside the old rows instead of mixing with them (rows whose record text
    changed are recomputed within a directory: see `PooledStore`)."""
    return study.run.path / "activations" / f"{name}-L{study.layer}-{key_of(pooling(study))[:8]}"
