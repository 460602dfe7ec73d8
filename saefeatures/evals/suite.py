"""One evaluation for any set of emotion directions: geometry, held-out detection, EmoBank.

Dense and SAE-assembled directions go through the same function, so their metrics.json sections
(``dense.*``, ``sae.k16.*``) hold the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..directions import EmotionDirections
from ..geometry import Geometry, analyze, uncertainty
from .detection import DetectionResult, evaluate
from .emobank import axis_spearman


@dataclass
class EvalConfig:
    """Which data the directions are evaluated on."""

    split: str = "test"
    """Corpus split for detection (topic-held-out)."""
    emobank_path: str | None = None
    """emobank.csv to read; None: the shipped copy."""
    emobank_limit: int | None = 3000
    """Sentences used (a fixed random subset); None: all ~10k."""
    reader_path: str | None = None
    """An external story set in the paper's format (JSONL(.gz) file or directory of them, e.g.
    emotion-vector-bench's stories/) for the reader test; None: no reader test."""
    reader_per_emotion: int | None = 25
    """Stories of each emotion the reader test reads, spread over topics; None: all."""


@dataclass
class EvalData:
    """Pooled activations the evaluation needs, at the directions' hook."""

    test_acts: torch.Tensor
    test_labels: list[str]
    emobank_acts: torch.Tensor | None = None
    emobank_valence: np.ndarray | None = None
    emobank_arousal: np.ndarray | None = None
    neutral_acts: torch.Tensor | None = None
    """Neutral texts of the same split: the level each direction's own emotion must read above."""


@dataclass
class DirectionReport:
    metrics: dict[str, float]
    geometry: Geometry
    detection: DetectionResult
    extra: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, dict[str, float]] = field(default_factory=dict)
    """Bootstrap intervals of valence_r, arousal_r, top1, cluster_acc, top1_display12 (`saefeatures.stats`)."""
    null: dict[str, dict[str, float]] = field(default_factory=dict)
    """Their null baselines: shuffled human ratings (geometry), shuffled labels (detection)."""


def evaluate_directions(dirs: EmotionDirections, data: EvalData, uncertain: bool = False) -> DirectionReport:
    """Geometry vs human norms, detection on the held-out split, and EmoBank Spearman; with
    ``uncertain``, the geometry's bootstrap intervals and nulls too (the detection's are cheap and
    always there)."""
    geo = analyze(dirs)
    det = evaluate(dirs, data.test_acts, data.test_labels, data.neutral_acts)
    metrics = {**geo.metrics(), **det.metrics()}
    if data.emobank_acts is not None:
        v_axis = torch.as_tensor(geo.valence_axis, dtype=torch.float32)
        a_axis = torch.as_tensor(geo.arousal_axis, dtype=torch.float32)
        metrics["emobank_valence_spearman"] = axis_spearman(data.emobank_acts, v_axis, data.emobank_valence, dirs.center)
        metrics["emobank_arousal_spearman"] = axis_spearman(data.emobank_acts, a_axis, data.emobank_arousal, dirs.center)
        if {"happy", "sad"} <= set(dirs.names):
            contrast = dirs.vector("happy") - dirs.vector("sad")
            metrics["emobank_happy_sad_spearman"] = axis_spearman(
                data.emobank_acts, contrast, data.emobank_valence, dirs.center)
    ci, null = uncertainty(dirs, geo) if uncertain else ({}, {})
    return DirectionReport({k: float(v) for k, v in metrics.items()}, geo, det, ci={**ci, **det.ci},
                           null={**null, **det.null})
