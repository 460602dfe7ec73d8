"""Dense directions at several layers from one forward pass, in one table, to pick the layer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..activations import PooledActivations, collect_pooled
from ..concepts import concept_sentences
from ..corpus import load_corpus
from ..directions import build_dense
from ..evals.emobank import load_emobank
from ..evals.suite import EvalData, evaluate_directions
from ..files import write_json
from ..hook_names import hook_name
from ..models import load_model
from .config import RunConfig
from .preflight import corpus_path

log = logging.getLogger(__name__)

COLUMNS = ("layer", "valence_r", "arousal_r", "arousal_best_r", "top1", "top5", "auroc",
           "emobank_valence_spearman", "emobank_arousal_spearman")


def sweep_layers(cfg: RunConfig, layers: list[int], out: Path | str) -> list[dict[str, float]]:
    """For each layer: dense directions from the train split, then geometry, detection and EmoBank."""
    out = Path(out)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    records = load_corpus(corpus_path(cfg))
    acts = collect_pooled(model, records, cfg.activations, out / "corpus", layers=layers, desc="sweep corpus")
    sentences = load_emobank(cfg.evals.emobank_path, limit=cfg.evals.emobank_limit)
    eb = collect_pooled(model, sentences, cfg.activations, out / "emobank", layers=layers, desc="sweep emobank")
    concepts = None
    if cfg.directions.concept_weight > 0:
        anchors = concept_sentences(sorted({r.emotion for r in records if r.split == "train" and r.emotion != "neutral"}))
        concepts = (collect_pooled(model, anchors, cfg.activations, out / "concepts", layers=layers, desc="sweep concepts"),
                    [s.emotion for s in anchors])
    rows = sweep_rows(cfg, layers, records, acts, eb, np.array([s.valence for s in sentences]),
                      np.array([s.arousal for s in sentences]), concepts)
    write_json(out / "sweep.json", rows)
    return rows


def sweep_rows(cfg: RunConfig, layers: list[int], records: list, acts: PooledActivations,
               emobank: PooledActivations, valence: np.ndarray, arousal: np.ndarray,
               concepts: tuple[PooledActivations, list[str]] | None = None) -> list[dict[str, float]]:
    """One row of metrics per layer from activations already pooled at every layer (``concepts``:
    pooled concept sentences and their emotions, for the dense recipe's anchor)."""
    train = [r for r in records if r.split == "train" and r.emotion != "neutral"]
    neutral = [r for r in records if r.split == "train" and r.emotion == "neutral"]
    test = [r for r in records if r.split == cfg.evals.split and r.emotion != "neutral"]
    rows = []
    for layer in layers:
        hook = hook_name(layer, cfg.activations.hook)
        dirs = build_dense(acts.subset([r.id for r in train])[hook], [r.emotion for r in train],
                           acts.subset([r.id for r in neutral])[hook], layer, cfg.directions, hook, cfg.activations,
                           None if concepts is None else (concepts[0][hook], concepts[1]))
        data = EvalData(acts.subset([r.id for r in test])[hook], [r.emotion for r in test], emobank[hook],
                        valence, arousal)
        rep = evaluate_directions(dirs, data)
        rows.append({"layer": layer, **rep.metrics})
        log.info("layer %d: %s", layer, {k: round(v, 3) for k, v in rep.metrics.items()})
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    head = " | ".join(f"{c:>10.10}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(f"{r.get(c, float('nan')):>10.3f}" if c != "layer" else f"{int(r[c]):>10d}"
                                for c in COLUMNS))
    return "\n".join(lines)
