"""External check on text nobody here wrote: EmoBank sentences with human valence and arousal.

Each sentence's pooled activation is projected on a valence axis and an arousal axis taken from
the emotion directions (PC1 and the arousal PC of their geometry, or a contrast such as
happy - sad); the Spearman rho with the human ratings says whether the axes generalise.

Data: Buechel & Hahn (2017), CC-BY-SA 4.0, shipped unmodified in ``data/emobank/``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ..emotions import DATA

EMOBANK_FILE = DATA / "emobank" / "emobank.csv"


@dataclass(frozen=True)
class Sentence:
    id: str
    split: str
    valence: float
    arousal: float
    text: str


def load_emobank(path: Path | str | None = None, splits: tuple[str, ...] = ("train", "dev", "test"),
                 limit: int | None = None) -> list[Sentence]:
    """EmoBank sentences (1-5 ratings) from the shipped file or ``path``; ``limit`` keeps the first n
    of a fixed shuffle, so small runs still span the corpus."""
    path = Path(path) if path else EMOBANK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"EmoBank file not found: {path}. Pass the path of emobank.csv (columns id,split,V,A,D,text).")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [Sentence(r["id"], r["split"], float(r["V"]), float(r["A"]), r["text"])
                for r in csv.DictReader(f) if r["split"] in splits and len(r["text"].split()) >= 3]
    if limit is not None and limit < len(rows):
        order = np.random.default_rng(0).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(order)]
    return rows


def axis_spearman(acts: torch.Tensor, axis: torch.Tensor | np.ndarray, ratings: np.ndarray,
                  center: torch.Tensor | None = None) -> float:
    """Spearman rho between projections of pooled activations on ``axis`` and human ratings."""
    x = acts.double()
    if center is not None:
        x = x - center.double()
    proj = (x @ torch.as_tensor(np.asarray(axis), dtype=torch.float64)).numpy()
    return float(spearmanr(proj, ratings)[0])
