"""The data and dense stages of `saefeatures run`: corpus and its audit, pooled activations, EmoBank,
the layer sweep, dense directions, the evaluations of any direction set, and the reader test.

Each stage writes its artifacts under a key of everything it was computed from and is skipped when
the key is unchanged and its outputs load (`RunDir.reuse`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..activations import PooledActivations, PooledStore, collect_pooled
from ..audit import AuditConfig, audit_corpus
from ..concepts import concept_sentences, templates_key
from ..corpus import corpus_stats
from ..corpus_import import story_set_key
from ..directions import EmotionDirections, build_dense, neutral_sample
from ..evals.emobank import EMOBANK_FILE, load_emobank
from ..evals.reader import read_stories
from ..evals.suite import DirectionReport, EvalData, evaluate_directions
from ..files import read_json, write_json
from ..keys import key_of
from ..model_cache import sha256_file
from ..models import model_identity
from ..report.geometry import save_plots
from ..stats import N_RESAMPLES, SEED
from .config import to_dict
from .context import Study, activations_dir, directions_key, exists_or_raise, fresh_dir, pooling, reuse_together
from .layer_sweep import sweep_rows

log = logging.getLogger(__name__)


def stage_corpus(study: Study) -> None:
    """The corpus counts (``corpus.*``), beside the audit's ``corpus.bow_*`` (`stage_corpus_audit`
    records those, so a command that runs no audit leaves them, and the record, as they were)."""
    stats = corpus_stats(study.records)
    audit = {k: v for k, v in (study.run.metrics.get("corpus") or {}).items() if k.startswith("bow_")}
    study.run.replace("corpus", {"n_stories": stats["n_stories"], "n_neutral": stats["n_neutral"],
                                 "min_per_emotion": stats["min_per_emotion"], "n_emotions": stats["n_emotions"],
                                 **audit})


def stage_corpus_audit(study: Study) -> None:
    """The model-free bag-of-words audit of the corpus (``corpus.bow_*``, corpus_audit.json)."""
    cfg = AuditConfig(test_split=study.cfg.evals.split)
    path = study.run.path / "corpus_audit.json"
    key = key_of(study.corpus_key, to_dict(cfg))
    result = study.run.reuse("corpus_audit", key, lambda: read_json(path))
    if result is None:
        with study.run.stage("corpus_audit", key):
            result = audit_corpus(study.records, cfg).to_dict()
            write_json(path, result)
    # stage_corpus replaced the corpus section, so the audit's keys go back in whether it ran or not
    study.run.record("corpus", {k: v for k, v in result.items() if k.startswith("bow_")})


def stage_reader(study: Study, dirs_by_name: dict[str, EmotionDirections]) -> None:
    """The reader test (``reader.<name>.*``, figures/reader.json) when ``evals.reader_path`` is set:
    the directions read an external story set; its pooled rows are cached under activations/."""
    ev = study.cfg.evals
    if not ev.reader_path:
        study.run.drop("reader")
        return
    path = study.run.path / "figures" / "reader.json"
    key = key_of(story_set_key(ev.reader_path), ev.reader_per_emotion, to_dict(study.cfg.activations),
                 study.model_key, {name: directions_key(d) for name, d in dirs_by_name.items()})
    if study.run.reuse("reader", key, lambda: read_json(path)) is not None:
        return
    with study.run.stage("reader", key):
        results = read_stories(study.model, dirs_by_name, ev.reader_path, study.cfg.activations,
                               study.run.path / "activations", ev.reader_per_emotion)
        write_json(path, {"path": ev.reader_path, **{name: r.to_dict() for name, r in results.items()}})
        study.run.replace("reader", {name: r.metrics() for name, r in results.items()})
        for name, r in results.items():
            if r.skipped:
                log.info("reader test (%s): skipped emotions the directions do not know: %s", name, r.skipped)


def stage_activations(study: Study) -> PooledActivations:
    """Pooled activations of the train and evaluation splits (rows the scoring pass already
    stored are read back, not recomputed)."""
    cfg = study.cfg.activations
    key = key_of(study.corpus_key, study.model_key, study.layers, to_dict(cfg))
    needed = [r for r in study.records if r.split in ("train", study.cfg.evals.split)]
    out = activations_dir(study)
    acts = reuse_together(study, "activations", key, lambda: PooledStore(out, pooling(study), cfg.shard_records,
                                                                         records=needed).read([r.id for r in needed]),
                          lambda: PooledActivations([], {}))
    if acts is None:
        with study.run.stage("activations", key):
            acts = collect_pooled(study.model, needed, cfg, out, layers=study.layers, world=study.world)
    return acts


def shared_store(study: Study, sae) -> PooledStore | None:
    """The activation stage's store, for the scoring pass to fill as it goes: one forward pass
    over the train split serves both stages when the SAE reads the studied hook."""
    if sae.cfg.metadata.hook_name != study.hook:
        return None
    return PooledStore(activations_dir(study), pooling(study), study.cfg.activations.shard_records, records=study.records,
                       world=study.world)


def emobank_key(study: Study) -> str:
    ev = study.cfg.evals
    path = Path(ev.emobank_path) if ev.emobank_path else EMOBANK_FILE
    return key_of(sha256_file(path) if path.is_file() else str(path), ev.emobank_limit, study.model_key,
                  study.layers, to_dict(study.cfg.activations))


def stage_emobank(study: Study) -> tuple[PooledActivations, np.ndarray, np.ndarray]:
    """Pooled activations of the EmoBank sentences at every layer, and their human valence and arousal."""
    ev = study.cfg.evals
    sentences = load_emobank(ev.emobank_path, limit=ev.emobank_limit)
    out = activations_dir(study, "emobank")
    key = emobank_key(study)
    cfg = study.cfg.activations
    acts = reuse_together(study, "emobank_activations", key, lambda: PooledStore(
        out, pooling(study), cfg.shard_records, records=sentences).read([s.id for s in sentences]),
                          lambda: PooledActivations([], {}))
    if acts is None:
        with study.run.stage("emobank_activations", key):
            acts = collect_pooled(study.model, sentences, cfg, out, layers=study.layers, desc="emobank",
                                  world=study.world)
    return acts, np.array([s.valence for s in sentences]), np.array([s.arousal for s in sentences])


def eval_data(study: Study, acts: PooledActivations,
              emobank: tuple[PooledActivations, np.ndarray, np.ndarray]) -> EvalData:
    split = study.cfg.evals.split
    test = [r for r in study.records if r.split == split and r.emotion != "neutral"]
    neutral = [r.id for r in study.records if r.split == split and r.emotion == "neutral"]
    eb_acts, eb_v, eb_a = emobank
    return EvalData(acts.subset([r.id for r in test])[study.hook], [r.emotion for r in test], eb_acts[study.hook],
                    eb_v, eb_a, acts.subset(neutral)[study.hook] if neutral else None)


def eval_key(study: Study) -> str:
    """What evaluations of directions read besides the directions: activations, EmoBank, config."""
    return key_of(study.key("activations"), study.key("emobank_activations"), to_dict(study.cfg.evals))


def stage_sweep(study: Study, acts: PooledActivations, emobank: tuple[PooledActivations, np.ndarray, np.ndarray],
                concepts: tuple[PooledActivations, list[str]] | None) -> None:
    """The dense recipe at every pooled layer, one table (``sweep.json``, ``layer_sweep.L*`` metrics)."""
    if len(study.layers) < 2:
        return
    path = study.run.path / "sweep.json"
    key = key_of(eval_key(study), study.key("concept_activations") if concepts else None, study.layers,
                 to_dict(study.cfg.directions))
    if study.run.reuse("layer_sweep", key, lambda: read_json(path)) is not None:
        return
    with study.run.stage("layer_sweep", key):
        rows = sweep_rows(study.cfg, study.layers, study.records, acts, *emobank, concepts=concepts)
        write_json(path, rows)
        study.run.replace("layer_sweep", {f"L{r['layer']}": {k: v for k, v in r.items() if k != "layer"}
                                          for r in rows})


def stage_concepts(study: Study) -> tuple[PooledActivations, list[str]] | None:
    """Pooled concept sentences (`saefeatures.concepts`) of the train split's emotions at every
    pooled layer, and their emotions; None when ``directions.concept_weight`` is 0. Rows the
    concept scoring pass already stored (`sae_stages.stage_concept_scores`) are read back."""
    if study.cfg.directions.concept_weight <= 0:
        return None
    emotions = sorted({r.emotion for r in study.records if r.split == "train" and r.emotion != "neutral"})
    sentences = concept_sentences(emotions)
    out = activations_dir(study, "concepts")
    cfg = study.cfg.activations
    key = key_of(templates_key(), emotions, study.model_key, study.layers, to_dict(cfg))
    # rank 0 alone (under torchrun the other ranks never build directions): no exchange with them
    acts = study.run.reuse("concept_activations", key, lambda: PooledStore(
        out, pooling(study), cfg.shard_records, records=sentences).read([s.id for s in sentences]))
    if acts is None:
        with study.run.stage("concept_activations", key):
            acts = collect_pooled(study.model, sentences, cfg, out, layers=study.layers, desc="concepts")
    return acts, [s.emotion for s in sentences]


def stage_dense(study: Study, acts: PooledActivations,
                concepts: tuple[PooledActivations, list[str]] | None) -> EmotionDirections:
    """The dense directions from the train split (``concepts``: `stage_concepts`)."""
    train = [r for r in study.records if r.split == "train" and r.emotion != "neutral"]
    neutral = [r for r in study.records if r.split == "train" and r.emotion == "neutral"]
    out = study.run.path / "directions" / "dense"
    key = key_of(study.key("activations"), study.key("concept_activations") if concepts else None, study.layer,
                 to_dict(study.cfg.directions))
    dirs = study.run.reuse("directions_dense", key, lambda: EmotionDirections.load(out))
    if dirs is None:
        with study.run.stage("directions_dense", key):
            dirs = build_dense(acts.subset([r.id for r in train])[study.hook], [r.emotion for r in train],
                               acts.subset([r.id for r in neutral])[study.hook], study.layer,
                               study.cfg.directions, study.hook, study.cfg.activations,
                               None if concepts is None else (concepts[0][study.hook], concepts[1]))
            split = study.cfg.evals.split
            held_out = [r.id for r in study.records if r.split == split and r.emotion == "neutral"]
            if len(held_out) >= 2:  # calibrated on neutral texts the directions were not built from
                dirs = replace(dirs, neutral=neutral_sample(acts.subset(held_out)[study.hook]))
                dirs.metadata["calibration"] = {"n_neutral": len(dirs.neutral), "source": f"{split} split"}
            dirs.metadata.update({"model": model_identity(study.model).name, "corpus": study.corpus_key})
            dirs.save(out)
    return dirs


def report_directions(study: Study, dirs: EmotionDirections, data: EvalData, section: str) -> None:
    """Geometry, detection and EmoBank of ``dirs``: the ``section`` of metrics (with ``ci.*`` and
    ``null.*``: bootstrap intervals and null baselines) and ``figures/section/`` (detection.json
    holds the per-emotion table and the confusion matrices)."""
    name = f"evals_{section.replace('.', '_')}"
    figs = study.run.path / "figures" / section
    key = key_of(directions_key(dirs), eval_key(study), section, N_RESAMPLES, SEED)
    if study.run.reuse(name, key, lambda: (read_json(figs / "detection.json"), read_json(figs / "geometry.json"),
                                           exists_or_raise(figs / "geometry.png"))) is not None:
        return
    with study.run.stage(name, key):
        rep: DirectionReport = evaluate_directions(dirs, data, uncertain=True)
        study.run.replace(section, {**rep.metrics, "ci": rep.ci, "null": rep.null})
        save_plots(rep.geometry, fresh_dir(figs), title=f"{section} directions, layer {dirs.layer}")
        write_json(figs / "detection.json", rep.detection.to_dict())
        write_json(figs / "geometry.json", {"names": rep.geometry.names, "scores": rep.geometry.scores,
                                            "explained": rep.geometry.explained, "clusters": rep.geometry.clusters})
