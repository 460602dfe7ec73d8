"""`saefeatures run`: the whole study as a chain of cached stages over one run directory.

model -> corpus -> activations -> dense directions -> evaluations (geometry, detection, EmoBank).
Each stage reads the artifacts of the one before from disk, so a rerun skips finished stages and
an interrupted one resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .activations import PooledActivations, collect_pooled, hook_name
from .config import RunConfig
from .corpus import DEFAULT_CORPUS, corpus_stats, load_corpus
from .directions import EmotionDirections, build_dense
from .evals.emobank import load_emobank
from .evals.suite import DirectionReport, EvalData, evaluate_directions
from .geometry import save_plots
from .models import check_layer, default_layer, load_model, model_identity, sha256_file
from .rundir import RunDir, key_of, package_versions
from .rundir import write_json

log = logging.getLogger(__name__)


@dataclass
class Study:
    """What the stages share while a run is in progress."""

    cfg: RunConfig
    run: RunDir
    model: Any
    layer: int
    records: list
    corpus_key: str

    @property
    def hook(self) -> str:
        return hook_name(self.layer, self.cfg.activations.hook)


def smoke_reply(model, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy chat reply from the HF twin: a quick check that the model loads and generates."""
    from .generation import GenerationConfig, Generator
    from .models import hf_twin

    gen = Generator(hf_twin(model), model.tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return gen.generate([prompt], seed=0)[0].strip()


def corpus_path(cfg: RunConfig) -> Path:
    return Path(cfg.corpus.path) if cfg.corpus.path else DEFAULT_CORPUS


def stage_corpus(study: Study) -> None:
    stats = corpus_stats(study.records)
    study.run.record("corpus", {"n_stories": stats["n_stories"], "n_neutral": stats["n_neutral"],
                                "min_per_emotion": stats["min_per_emotion"], "n_emotions": stats["n_emotions"]})


def stage_activations(study: Study) -> PooledActivations:
    cfg = study.cfg.activations
    out = study.run.path / "activations" / f"L{study.layer}"
    key = key_of(study.corpus_key, model_identity(study.model).sha256, study.layer, config_mod.to_dict(cfg))
    with study.run.stage("activations", key):
        acts = collect_pooled(study.model, study.records, cfg, out, layers=[study.layer])
    return acts


def emobank_eval_data(study: Study) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    ev = study.cfg.evals
    sentences = load_emobank(ev.emobank_path, limit=ev.emobank_limit)
    out = study.run.path / "activations" / f"emobank-L{study.layer}"
    key = key_of(ev.emobank_path, ev.emobank_limit, study.layer, config_mod.to_dict(study.cfg.activations))
    with study.run.stage("emobank_activations", key):
        acts = collect_pooled(study.model, sentences, study.cfg.activations, out, layers=[study.layer], desc="emobank")
    return (acts[study.hook], np.array([s.valence for s in sentences]), np.array([s.arousal for s in sentences]))


def eval_data(study: Study, acts: PooledActivations) -> EvalData:
    split = study.cfg.evals.split
    test = [r for r in study.records if r.split == split and r.emotion != "neutral"]
    eb_acts, eb_v, eb_a = emobank_eval_data(study)
    return EvalData(acts.subset([r.id for r in test])[study.hook], [r.emotion for r in test], eb_acts, eb_v, eb_a)


def stage_dense(study: Study, acts: PooledActivations) -> EmotionDirections:
    train = [r for r in study.records if r.split == "train" and r.emotion != "neutral"]
    neutral = [r for r in study.records if r.split == "train" and r.emotion == "neutral"]
    with study.run.stage("directions_dense"):
        dirs = build_dense(acts.subset([r.id for r in train])[study.hook], [r.emotion for r in train],
                           acts.subset([r.id for r in neutral])[study.hook], study.layer,
                           study.cfg.directions, study.hook)
        dirs.metadata.update({"model": model_identity(study.model).name, "corpus": study.corpus_key})
        dirs.save(study.run.path / "directions" / "dense")
    return dirs


def report_directions(study: Study, dirs: EmotionDirections, data: EvalData, section: str) -> DirectionReport:
    with study.run.stage(f"evals_{section.replace('.', '_')}"):
        rep = evaluate_directions(dirs, data)
        study.run.record(section, rep.metrics)
        figs = study.run.path / "figures" / section
        save_plots(rep.geometry, figs, title=f"{section} directions, layer {dirs.layer}")
        write_json(figs / "detection.json", {"metrics": rep.detection.metrics(), "per_emotion": rep.detection.per_emotion})
        write_json(figs / "geometry.json", {"names": rep.geometry.names, "scores": rep.geometry.scores,
                                            "explained": rep.geometry.explained, "clusters": rep.geometry.clusters})
    return rep


def open_study(cfg: RunConfig, out: Path | str, config_path: str | None = None) -> Study:
    """Load the model (with a smoke reply) and the corpus, and open the run directory."""
    run = RunDir.open(out)
    run.manifest.update({"config": config_mod.to_dict(cfg), "config_path": config_path,
                         "packages": package_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with run.stage("model"):
        model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    identity = model_identity(model)
    layer = cfg.model.layer if cfg.model.layer is not None else default_layer(cfg.model.name, model.cfg.n_layers)
    check_layer(model, layer)
    run.manifest["model"] = identity.to_dict()
    run.record("model", {"id": identity.name, "layer": layer})
    with run.stage("smoke"):
        reply = smoke_reply(model, cfg.smoke_prompt)
        run.manifest["smoke"] = {"prompt": cfg.smoke_prompt, "reply": reply}
    log.info("smoke check reply: %s", reply)
    path = corpus_path(cfg)
    study = Study(cfg, run, model, layer, load_corpus(path), sha256_file(path)[:16])
    run.manifest["corpus"] = {"path": str(path), "sha256_16": study.corpus_key}
    stage_corpus(study)
    return study


def run_study(cfg: RunConfig, out: Path | str, config_path: str | None = None) -> RunDir:
    """Run every stage of the study into ``out``; returns the run directory."""
    t0 = time.perf_counter()
    study = open_study(cfg, out, config_path)
    acts = stage_activations(study)
    data = eval_data(study, acts)
    dense = stage_dense(study, acts)
    report_directions(study, dense, data, "dense")
    set_total(study.run, t0)
    return study.run


def set_total(run: RunDir, t0: float) -> None:
    run.record("timings", {"total_s": round(time.perf_counter() - t0, 2)})
