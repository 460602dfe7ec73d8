"""The reader test: emotion directions reading a story set written by someone else.

Held-out detection reads the corpus the directions were built from (other topics, same writer);
this reads external stories in the paper's format (e.g. emotion-vector-bench, written by a strong
model), so it measures directions apart from how well the subject model writes. Each story is
pooled like the corpus, projected on the directions of the emotions the set has, and each
direction's projections are z-scored over the stories before the argmax (a direction that reads
high on every story would otherwise win every argmax). Emotions the directions do not know are
skipped and named.

Example:
    >>> res = read_stories(model, {"dense": EmotionDirections.load("runs/x/directions/dense")},
    ...                    "emotion-vector-bench/stories", ActivationConfig(max_tokens=128))["dense"]
    >>> res.top1, res.skipped
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..activations import ActivationConfig, collect_pooled, pooling_meta
from ..corpus_import import Story, cap_per_emotion, read_story_set, story_set_key
from ..directions import EmotionDirections
from .detection import auroc


@dataclass
class ReaderResult:
    """How well directions read an external story set (chance top-1 is 1 / len(emotions))."""

    top1: float
    top3: float
    auroc: float
    """Mean one-vs-rest AUROC over the emotions read."""
    n: int
    """Stories read."""
    emotions: list[str]
    skipped: list[str] = field(default_factory=list)
    """Emotions of the set the directions do not know."""
    per_emotion: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"top1": self.top1, "top3": self.top3, "auroc": self.auroc, "n": float(self.n),
                "n_emotions": float(len(self.emotions))}

    def to_dict(self) -> dict:
        return {**self.metrics(), "emotions": self.emotions, "skipped": self.skipped, "per_emotion": self.per_emotion}


def zscore_columns(scores: np.ndarray) -> np.ndarray:
    """Each column standardised over the rows (a constant column becomes zeros)."""
    sd = scores.std(0)
    return (scores - scores.mean(0)) / np.where(sd > 0, sd, 1.0)


def score_reading(scores: np.ndarray, labels: Sequence[str], names: Sequence[str]) -> ReaderResult:
    """Reader metrics from projections (n_stories, len(names)) on the directions of ``names``, one
    per emotion of the set: z-scored per direction, then top-1, top-3 and mean AUROC."""
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[label] for label in labels])
    z = zscore_columns(np.asarray(scores, dtype=np.float64))
    order = np.argsort(-z, axis=1, kind="stable")
    per = {n: {"auroc": auroc(z[:, j], y == j), "top1": float((order[y == j, 0] == j).mean()),
               "n": float((y == j).sum())} for j, n in enumerate(names) if (y == j).any()}
    return ReaderResult(float((order[:, 0] == y).mean()), float((order[:, :3] == y[:, None]).any(1).mean()),
                        float(np.nanmean([d["auroc"] for d in per.values()])), len(y), list(names), per_emotion=per)


def readable(dirs: EmotionDirections, stories: Sequence[Story]) -> tuple[list[Story], list[str], list[str]]:
    """The stories whose emotion the directions know, those emotions (sorted), and the skipped ones."""
    present = sorted({s.emotion for s in stories})
    known = [e for e in present if e in dirs.names]
    if len(known) < 2:
        raise ValueError(f"The directions ({len(dirs.names)} emotions) know {len(known)} of the story set's "
                         f"emotions {present[:10]}; the reader test needs at least 2 in common.")
    keep = set(known)
    return [s for s in stories if s.emotion in keep], known, [e for e in present if e not in keep]


def read_stories(
    model,
    dirs_by_name: dict[str, EmotionDirections],
    src: Path | str,
    cfg: ActivationConfig,
    cache_dir: Path | str | None = None,
    per_emotion: int | None = None,
) -> dict[str, ReaderResult]:
    """Read the story set ``src`` (a JSONL(.gz) file or a directory of them) with each set of
    directions (all at one hook), pooling as ``cfg`` says.

    The pooled rows are cached under ``cache_dir`` in a directory keyed by the files' content, the
    hook and the pooling, so a later call (another run's directions, a larger ``per_emotion``)
    pools only stories not pooled yet. ``per_emotion`` caps the stories per emotion, spread over topics.
    """
    hooks = {d.hook for d in dirs_by_name.values()}
    if len(hooks) != 1:
        raise ValueError(f"The directions to read with sit at different hooks {sorted(hooks)}; pass one hook's.")
    hook = hooks.pop()
    layer = next(iter(dirs_by_name.values())).layer
    if hook != f"blocks.{layer}.{cfg.hook}":
        raise ValueError(f"The directions sit at {hook} but activations.hook is {cfg.hook}; pool at the same hook.")
    stories = cap_per_emotion(read_story_set(src), per_emotion)
    readings = {name: readable(dirs, stories) for name, dirs in dirs_by_name.items()}
    needed = {s.id for kept, _, _ in readings.values() for s in kept}
    out_dir = None
    if cache_dir is not None:
        meta = pooling_meta(model, [hook], cfg)
        key = hashlib.sha256(json.dumps([story_set_key(src), meta], sort_keys=True).encode()).hexdigest()[:8]
        out_dir = Path(cache_dir) / f"reader-L{layer}-{key}"
    pooled = collect_pooled(model, [s for s in stories if s.id in needed], cfg, out_dir, layers=[layer], desc="reader")
    results = {}
    for name, (kept, known, skipped) in readings.items():
        acts = pooled.subset([s.id for s in kept])[hook]
        with torch.no_grad():
            scores = dirs_by_name[name].subset(known).project(acts).numpy()
        results[name] = score_reading(scores, [s.emotion for s in kept], known)
        results[name].skipped = skipped
    return results
