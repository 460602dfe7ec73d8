"""Held-out detection: does projecting a record on every direction recover its emotion?

Records of the topic-held-out test split are projected on each emotion's direction; the highest
projection is the prediction. Reported: 171-way top-1 and top-5 accuracy, mean one-vs-rest AUROC
(exact, by the Mann-Whitney U statistic), a per-emotion table, and two coarser readings: top-1
among the paper's 12 display emotions only, and whether the predicted emotion falls in the true
one's cluster (the paper's 10). Any `EmotionDirections` (dense or SAE-assembled) plugs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from .. import emotions as emo
from ..directions import EmotionDirections

CLUSTERS: dict[str, str] = {e.name: e.cluster for e in emo.EMOTIONS}
"""Emotion -> the paper's k-means cluster (k=10)."""


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Exact AUROC (ties count one half) from ranks: U / (n_pos * n_neg)."""
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@dataclass
class DetectionResult:
    top1: float
    top5: float
    auroc: float
    """Mean one-vs-rest AUROC over emotions with test records."""
    n_records: int
    n_classes: int
    per_emotion: dict[str, dict[str, float]]
    """name -> {'auroc', 'top1', 'n'}."""
    top1_display12: float | None = None
    """Top-1 among the display emotions only, on their records (None: fewer than two present)."""
    cluster_acc: float | None = None
    """Share of records whose predicted emotion is in the true one's cluster (None: unknown names)."""

    def metrics(self) -> dict[str, float]:
        coarse = {"top1_display12": self.top1_display12, "cluster_acc": self.cluster_acc}
        return {"top1": self.top1, "top5": self.top5, "auroc": self.auroc,
                **{k: v for k, v in coarse.items() if v is not None}}

    def table(self, sort_by: str = "auroc") -> list[tuple[str, float, float, int]]:
        rows = [(n, d["auroc"], d["top1"], int(d["n"])) for n, d in self.per_emotion.items()]
        return sorted(rows, key=lambda r: -r[1 if sort_by == "auroc" else 2])


def evaluate_scores(scores: torch.Tensor | np.ndarray, labels: Sequence[str], names: Sequence[str]) -> DetectionResult:
    """Detection metrics from a (n_records, n_emotions) score matrix and true labels."""
    scores = np.asarray(scores, dtype=np.float64)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"Labels without a direction: {unknown[:5]}")
    y = np.array([index[label] for label in labels])
    order = np.argsort(-scores, axis=1)
    top1 = float((order[:, 0] == y).mean())
    top5 = float((order[:, :5] == y[:, None]).any(1).mean())
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        pos = y == j
        if pos.any():
            per[name] = {"auroc": auroc(scores[:, j], pos), "top1": float((order[pos, 0] == j).mean()),
                         "n": float(pos.sum())}
    return DetectionResult(top1, top5, float(np.nanmean([d["auroc"] for d in per.values()])),
                           len(y), len(per), per, display_top1(scores, y, names), cluster_accuracy(order[:, 0], y, names))


def display_top1(scores: np.ndarray, y: np.ndarray, names: Sequence[str],
                 display: Sequence[str] = emo.DISPLAY) -> float | None:
    """Top-1 accuracy of the records of the display emotions, choosing among those emotions only."""
    cols = [j for j, n in enumerate(names) if n in display and (y == j).any()]
    if len(cols) < 2:
        return None
    rows = np.isin(y, cols)
    pred = np.asarray(cols)[scores[np.ix_(rows, cols)].argmax(1)]
    return float((pred == y[rows]).mean())


def cluster_accuracy(pred: np.ndarray, y: np.ndarray, names: Sequence[str]) -> float | None:
    """Share of predictions (indices into ``names``) in the true emotion's cluster; None when a
    name is not one of the paper's emotions."""
    if not all(n in CLUSTERS for n in names):
        return None
    cluster = np.array([CLUSTERS[n] for n in names])
    return float((cluster[pred] == cluster[y]).mean())


def evaluate(dirs: EmotionDirections, acts: torch.Tensor, labels: Sequence[str]) -> DetectionResult:
    """Project pooled activations (rows aligned with ``labels``) on ``dirs`` and score detection."""
    return evaluate_scores(dirs.project(acts).numpy(), labels, dirs.names)
