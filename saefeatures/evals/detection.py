"""Held-out detection: does projecting a record on every direction recover its emotion?

Records of the topic-held-out test split are projected on each emotion's direction; the highest
projection is the prediction. Reported: 171-way top-1 and top-5 accuracy, mean one-vs-rest AUROC
(exact, by the Mann-Whitney U statistic), a per-emotion table, and two coarser readings: top-1
among the paper's 12 display emotions only, and whether the predicted emotion falls in the true
one's cluster (the paper's 10), each with its confusion matrix (rows: true, columns: predicted),
a bootstrap interval over records and a permutation null (labels shuffled), which for the
cluster reading is not 1 / 10: the clusters differ in size. Given neutral texts, each direction's
mean projection on its own emotion's records and on the neutral ones (a direction that reads its
own emotion below neutral contradicts the method). Any `EmotionDirections` (dense or SAE-assembled)
plugs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from .. import emotions as emo
from ..directions import EmotionDirections
from ..stats import N_RESAMPLES, SEED, interval, null_summary

CLUSTERS: dict[str, str] = {e.name: e.cluster for e in emo.EMOTIONS}
"""Emotion -> the paper's k-means cluster (k=10)."""
CLUSTER_NAMES: tuple[str, ...] = tuple(sorted(set(CLUSTERS.values())))


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
    confusion_clusters: dict[str, Any] | None = None
    """``{'labels': the 10 clusters, 'matrix': counts}``, rows true, columns predicted."""
    confusion_display: dict[str, Any] | None = None
    """The same over the 12 display emotions, for the top1_display12 reading."""
    ci: dict[str, dict[str, float]] = field(default_factory=dict)
    """Bootstrap intervals over records of top1, cluster_acc and top1_display12."""
    null: dict[str, dict[str, float]] = field(default_factory=dict)
    """Their permutation nulls (true labels shuffled over the records)."""
    n_below_neutral: int | None = None
    """Emotions whose direction reads their own records below the neutral texts (None: no neutral texts)."""

    def metrics(self) -> dict[str, float]:
        coarse = {"top1_display12": self.top1_display12, "cluster_acc": self.cluster_acc,
                  "n_below_neutral": None if self.n_below_neutral is None else float(self.n_below_neutral)}
        return {"top1": self.top1, "top5": self.top5, "auroc": self.auroc,
                **{k: v for k, v in coarse.items() if v is not None}}

    def to_dict(self) -> dict[str, Any]:
        """What figures/<directions>/detection.json holds."""
        return {"metrics": self.metrics(), "per_emotion": self.per_emotion, "ci": self.ci, "null": self.null,
                "confusion_clusters": self.confusion_clusters, "confusion_display": self.confusion_display}

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
    res = DetectionResult(top1, top5, float(np.nanmean([d["auroc"] for d in per.values()])),
                          len(y), len(per), per, display_top1(scores, y, names), cluster_accuracy(order[:, 0], y, names))
    readings = {"top1": (order[:, 0], y)}
    if res.cluster_acc is not None:
        cluster = np.array([CLUSTER_NAMES.index(CLUSTERS[n]) for n in names])
        readings["cluster_acc"] = (cluster[order[:, 0]], cluster[y])
        res.confusion_clusters = confusion(cluster[y], cluster[order[:, 0]], CLUSTER_NAMES)
    if (display := display_predictions(scores, y, names)) is not None:
        true, pred = display
        readings["top1_display12"] = (pred, true)
        index = np.array([emo.DISPLAY.index(n) if n in emo.DISPLAY else -1 for n in names])
        res.confusion_display = confusion(index[true], index[pred], emo.DISPLAY)
    for name, (pred, true) in readings.items():
        res.ci[name], res.null[name] = accuracy_uncertainty(pred, true)
    res.ci = {k: v for k, v in res.ci.items() if v}
    res.null = {k: v for k, v in res.null.items() if v}
    return res


def confusion(true: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Counts of (true, predicted) label indices, every label a row and a column."""
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (true, pred), 1)
    return {"labels": list(labels), "matrix": matrix.tolist()}


def accuracy_uncertainty(pred: np.ndarray, true: np.ndarray, n_boot: int = N_RESAMPLES,
                         seed: int = SEED) -> tuple[dict | None, dict | None]:
    """Bootstrap interval (records resampled) and permutation null (true labels shuffled) of the
    share of ``pred == true``."""
    rng = np.random.default_rng(seed)
    correct = pred == true
    ci = interval(correct[rng.integers(0, len(correct), (n_boot, len(correct)))].mean(1), n_boot)
    shuffled = true[np.argsort(rng.random((n_boot, len(true))), axis=1)]
    return ci, null_summary(float(correct.mean()), (pred[None, :] == shuffled).mean(1))


def display_predictions(scores: np.ndarray, y: np.ndarray, names: Sequence[str],
                        display: Sequence[str] = emo.DISPLAY) -> tuple[np.ndarray, np.ndarray] | None:
    """(true, predicted) indices into ``names`` of the display emotions' records, choosing among the
    display emotions that have records; None when fewer than two do."""
    cols = [j for j, n in enumerate(names) if n in display and (y == j).any()]
    if len(cols) < 2:
        return None
    rows = np.isin(y, cols)
    return y[rows], np.asarray(cols)[scores[np.ix_(rows, cols)].argmax(1)]


def display_top1(scores: np.ndarray, y: np.ndarray, names: Sequence[str],
                 display: Sequence[str] = emo.DISPLAY) -> float | None:
    """Top-1 accuracy of the records of the display emotions, choosing among those emotions only."""
    found = display_predictions(scores, y, names, display)
    return None if found is None else float((found[0] == found[1]).mean())


def cluster_accuracy(pred: np.ndarray, y: np.ndarray, names: Sequence[str]) -> float | None:
    """Share of predictions (indices into ``names``) in the true emotion's cluster; None when a
    name is not one of the paper's emotions."""
    if not all(n in CLUSTERS for n in names):
        return None
    cluster = np.array([CLUSTERS[n] for n in names])
    return float((cluster[pred] == cluster[y]).mean())


def evaluate(dirs: EmotionDirections, acts: torch.Tensor, labels: Sequence[str],
             neutral_acts: torch.Tensor | None = None) -> DetectionResult:
    """Project pooled activations (rows aligned with ``labels``) on ``dirs`` and score detection;
    with ``neutral_acts``, each direction's mean projection on its own records and on neutral texts
    (``own_mean``, ``neutral_mean`` per emotion, and how many read their own below neutral)."""
    scores = dirs.project(acts).numpy()
    res = evaluate_scores(scores, labels, dirs.names)
    if neutral_acts is not None and len(neutral_acts):
        neutral = dirs.project(neutral_acts).double().mean(0).numpy()
        labels = np.asarray(labels)
        for name, d in res.per_emotion.items():
            j = dirs.index(name)
            d["own_mean"], d["neutral_mean"] = float(scores[labels == name, j].mean()), float(neutral[j])
        res.n_below_neutral = sum(d["own_mean"] < d["neutral_mean"] for d in res.per_emotion.values())
    return res
