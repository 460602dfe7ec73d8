"""Geometry of emotion directions: PCA against human valence and arousal, clustering, plots.

The paper found PC1 of its 171 vectors tracks valence (r = 0.81) and PC2 arousal (r = 0.66) on 45
words with PAD ratings; here the ratings are Warriner et al. (2013), on every word that has one.
PC signs are arbitrary, so each PC is sign-aligned to make its correlation positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.stats import pearsonr, spearmanr

from . import emotions as emo
from .directions import EmotionDirections
from .stats import N_RESAMPLES, SEED, bootstrap, null_summary, permuted


@dataclass
class Geometry:
    """PCA of a set of directions and how its axes line up with human ratings."""

    names: list[str]
    scores: np.ndarray
    """(n_emotions, n_pcs) PC coordinates, sign-aligned (PC1 with valence, PC2 with arousal)."""
    axes: np.ndarray
    """(n_pcs, d_model) unit PC axes in activation space, with the same signs."""
    explained: np.ndarray
    """Fraction of variance per PC."""
    valence_r: float
    valence_spearman: float
    arousal_r: float
    arousal_spearman: float
    arousal_best_r: float
    """Best |r| of arousal over the first 4 PCs."""
    arousal_best_pc: int
    """The PC (0-based, from PC2 on: PC1 is the valence axis) that tracks arousal best."""
    n_rated: int
    clusters: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"valence_r": self.valence_r, "arousal_r": self.arousal_r, "arousal_best_r": self.arousal_best_r,
                "valence_spearman": self.valence_spearman, "arousal_spearman": self.arousal_spearman,
                "pc1_explained": float(self.explained[0]), "pc2_explained": float(self.explained[1])}

    @property
    def valence_axis(self) -> np.ndarray:
        return self.axes[0]

    @property
    def arousal_axis(self) -> np.ndarray:
        return self.axes[self.arousal_best_pc]


def _ratings(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [i for i, n in enumerate(names) if n in emo.NAMES and emo.get(n).valence is not None]
    v = np.array([emo.get(names[i]).valence for i in rows])
    a = np.array([emo.get(names[i]).arousal for i in rows])
    return np.array(rows, dtype=int), v, a


def analyze(dirs: EmotionDirections, n_pcs: int = 4, n_clusters: int = 10) -> Geometry:
    """PCA of the direction vectors and correlations of PC1/PC2 with valence/arousal."""
    x = dirs.vectors.double().numpy()
    x = x - x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    n_pcs = min(n_pcs, len(s) - 1)  # n centered vectors span n - 1 dimensions: the last PC is float noise
    scores, axes = u[:, :n_pcs] * s[:n_pcs], vt[:n_pcs].copy()
    explained = (s**2 / (s**2).sum())[:n_pcs]
    rows, v, a = _ratings(dirs.names)
    if len(rows) < 3:
        raise ValueError("Fewer than 3 of these emotions have human ratings; geometry needs more.")

    def align(pc: int, target: np.ndarray) -> float:
        r = pearsonr(scores[rows, pc], target)[0]
        if r < 0:
            scores[:, pc] *= -1
            axes[pc] *= -1
        return abs(float(r))

    valence_r = align(0, v)
    arousal_r = align(1, a) if n_pcs > 1 else float("nan")
    best = [abs(float(pearsonr(scores[rows, k], a)[0])) for k in range(n_pcs)]
    best_pc = int(np.argmax(best[1:]) + 1) if n_pcs > 1 else 0
    if best_pc > 1:
        align(best_pc, a)
    clusters: dict[str, int] = {}
    if len(dirs.names) > n_clusters:
        z = linkage(dirs.vectors.double().numpy(), method="average", metric="cosine")
        clusters = dict(zip(dirs.names, fcluster(z, n_clusters, criterion="maxclust").tolist()))
    return Geometry(
        names=list(dirs.names), scores=scores, axes=axes, explained=explained,
        valence_r=valence_r, valence_spearman=float(spearmanr(scores[rows, 0], v)[0]),
        arousal_r=arousal_r, arousal_spearman=float(spearmanr(scores[rows, 1], a)[0]) if n_pcs > 1 else float("nan"),
        arousal_best_r=max(best), arousal_best_pc=best_pc,
        n_rated=len(rows), clusters=clusters,
    )


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def uncertainty(dirs: EmotionDirections, geo: Geometry, n_boot: int = N_RESAMPLES,
                seed: int = SEED) -> tuple[dict[str, dict], dict[str, dict]]:
    """Bootstrap intervals and permutation nulls of ``valence_r`` and ``arousal_r``: ``(ci, null)``.

    The interval resamples the emotions (the PCA is redone on each resample, each PC's sign set by
    the full sample's axis, so a resample whose PC1 stops tracking valence counts as such); the
    null shuffles the human ratings over the rated emotions and takes |r| of the same PC, as the
    observed r's sign is aligned after the fact."""
    x = dirs.vectors.double().numpy()
    u, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    z = u * s  # coordinates in the PCs' basis: each resample's PCA runs in this n x n space
    signs = np.sign(np.einsum("kd,kd->k", geo.axes, vt[: len(geo.axes)]))
    v = np.array([emo.get(n).valence if n in emo.NAMES and emo.get(n).valence is not None else np.nan
                  for n in dirs.names])
    a = np.array([emo.get(n).arousal if n in emo.NAMES and emo.get(n).arousal is not None else np.nan
                  for n in dirs.names])
    rated = ~np.isnan(v)
    ci, null = {}, {}
    for name, pc, target, observed in (("valence_r", 0, v, geo.valence_r), ("arousal_r", 1, a, geo.arousal_r)):
        if pc >= len(geo.axes) or not math.isfinite(observed):
            continue

        def resampled_r(idx: np.ndarray, pc: int = pc, target: np.ndarray = target) -> float:
            zc = z[idx] - z[idx].mean(0)
            axis = np.linalg.svd(zc, full_matrices=False)[2][pc]
            scores = zc @ axis * (np.sign(axis[pc]) or 1.0) * signs[pc]
            keep = rated[idx]
            return _pearson(scores[keep], target[idx][keep])

        ci[name] = bootstrap(resampled_r, len(z), n_boot, seed)
        scores, t = geo.scores[rated, pc], target[rated]
        null[name] = null_summary(observed, permuted(lambda p: abs(_pearson(scores, t[p])), len(t), n_boot, seed))
    return {k: c for k, c in ci.items() if c}, {k: n for k, n in null.items() if n}


def direction_cosines(a: EmotionDirections, b: EmotionDirections) -> dict[str, float]:
    """Cosine between same-named vectors of two direction sets."""
    common = [n for n in a.names if n in b.names]
    va = torch.stack([a.vector(n) for n in common]).float()
    vb = torch.stack([b.vector(n) for n in common]).float()
    cos = torch.nn.functional.cosine_similarity(va, vb, dim=1)
    return dict(zip(common, cos.tolist()))
