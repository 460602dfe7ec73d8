"""The SAE stages of `saefeatures run`: load or train the SAE and evaluate it, score its latents on
the corpus, measure what candidates write, assemble SAE directions for every k, and feature cards.
Also the run config's SAE helpers the CLI shares (`prepare_sae`, `train_run_sae`, `evaluate_run_sae`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..activations import PooledStore
from ..concepts import concept_sentences, templates_key
from ..corpus import DEFAULT_CORPUS, load_corpus
from ..directions import EmotionDirections
from ..evals.suite import EvalData
from ..feature_cards import build_cards, build_latent_table, load_cards
from ..files import load_safetensors, read_json, save_safetensors, write_json, write_text
from ..geometry import direction_cosines
from ..hook_names import hook_name
from ..keys import key_of
from ..latents import LatentTable
from ..model_cache import sha256_file
from ..models import load_model, model_identity, resolve_layer
from ..report.cards import cards_page
from ..sae import (LatentScores, SAEConfig, SAEEvals, evaluate_sae, load_sae, sae_fingerprint, score_latents,
                   shipped_sae_dir, train_sae)
from ..sae.assemble import build_sae
from ..sae.data import held_out_texts
from ..sae.effects import output_scores
from ..sae.train import TrainResult, finished
from .config import RunConfig, to_dict
from .context import Study, activations_dir, directions_key, exists_or_raise, pooling, reuse_together
from .stages import report_directions, shared_store
from .tracking import Tracker

log = logging.getLogger(__name__)


def stage_sae(study: Study):
    """Load (or train, then load) the SAE per the config, and record its quality on held-out text
    (rank 0; the other ranks of a distributed run load the SAE once it is ready)."""
    if not study.world.leader:
        study.world.sync("sae", timeout_s=study.world.wait_s)
        return prepare_sae(study.cfg, study.model, study.run.path)
    sae = _leader_sae(study)
    study.world.sync("sae")
    return sae


def _leader_sae(study: Study):
    with study.run.stage("sae_load"):
        sae = prepare_sae(study.cfg, study.model, study.run.path)
    path = study.run.path / "sae_evals.json"
    key = key_of(study.corpus_key, study.model_key, study.layer, sae_fingerprint(sae), to_dict(study.cfg.sae.eval))
    evals = study.run.reuse("sae_eval", key, lambda: SAEEvals.load(path))
    if evals is None:
        with study.run.stage("sae_eval", key):
            recorded = _recorded_evals(study, sae)
            if recorded is not None:
                log.info("SAE evals: reusing %s (same SAE, corpus and eval config)", recorded)
                shutil.copyfile(recorded, path)
            else:
                evaluate_run_sae(study.cfg, sae_path=_sae_dir(sae, study), model=study.model, save_to=path)
            evals = SAEEvals.load(path)
    study.run.record("", {**evals.metrics(), "sae.dense_fraction": evals.dense_fraction,
                          "sae.ce_loss_recovered_with_error_term": evals.ce_loss_recovered_with_error_term})
    study.run.manifest["sae"] = {"hook": sae.cfg.metadata.hook_name, "d_sae": sae.cfg.d_sae,
                                 "architecture": sae.cfg.architecture(), "source": study.cfg.sae.source,
                                 "path": _sae_dir(sae, study)}
    return sae


def _recorded_evals(study: Study, sae) -> Path | None:
    """The evals.json saved beside a local SAE, if measured on exactly this run's inputs."""
    where = _sae_dir(sae, study)
    recorded = Path(where) / "evals.json" if where else None
    if recorded is None or not recorded.is_file():
        return None
    extra = read_json(recorded).get("extra", {})
    return recorded if extra.get("inputs_key") == evals_inputs_key(study.cfg) else None


def _sae_dir(sae, study: Study) -> str | None:
    cfg = study.cfg.sae
    if cfg.source == "local":
        return cfg.path or str(shipped_sae_dir(study.cfg.model.name, study.layer))
    if cfg.source == "train":
        return cfg.train.out or str(study.run.path / "sae-train" / "sae")
    return None


def stage_scores(study: Study, sae) -> LatentScores:
    cfg = study.cfg.scoring
    records = [r for r in study.records if r.split == cfg.split]
    out = study.run.path / "scores"
    key = key_of(study.corpus_key, study.model_key, study.layer, sae_fingerprint(sae), to_dict(cfg),
                 pooling(study, [sae.cfg.metadata.hook_name]), study.cfg.activations.batch_tokens)
    scores = reuse_together(study, "scoring", key, lambda: LatentScores.load(out))
    if scores is None:
        with study.run.stage("scoring", key):
            store = shared_store(study, sae)
            held_out = [r for r in study.records if r.split == study.cfg.evals.split]
            scores = score_latents(study.model, sae, records, cfg, study.cfg.activations, pooled=store,
                                   scale_records=held_out if store is not None and held_out else None,
                                   world=study.world)
            if study.world.leader:
                scores.save(out)
        if study.world.leader:
            scores = LatentScores.load(out)
    return scores


def stage_concept_scores(study: Study, sae) -> LatentScores | None:
    """Latent scores of the concept sentences (`saefeatures.concepts`) of the scored emotions, which
    SAE directions rank latents by beside the stories' (rank 0 alone); None when
    ``directions.concept_weight`` is 0. The pass also pools the sentences for `stage_concepts`."""
    if study.cfg.directions.concept_weight <= 0:
        return None
    cfg = study.cfg.scoring
    emotions = sorted({r.emotion for r in study.records if r.split == cfg.split and r.emotion != "neutral"})
    out = study.run.path / "scores" / "concepts"
    key = key_of(templates_key(), emotions, study.model_key, study.layer, sae_fingerprint(sae), to_dict(cfg),
                 pooling(study, [sae.cfg.metadata.hook_name]), study.cfg.activations.batch_tokens)
    scores = study.run.reuse("concept_scoring", key, lambda: LatentScores.load(out))
    if scores is None:
        with study.run.stage("concept_scoring", key):
            sentences = concept_sentences(emotions)
            scores = score_latents(study.model, sae, sentences, cfg, study.cfg.activations, desc="concept scoring",
                                   pooled=concept_store(study, sae, sentences))
            scores.save(out)
    return scores


def concept_store(study: Study, sae, sentences) -> PooledStore | None:
    """The concept activation stage's store, for the concept scoring pass to fill as it goes when
    the SAE reads the studied hook (rank 0 alone: no exchange with the other ranks)."""
    if sae.cfg.metadata.hook_name != study.hook:
        return None
    return PooledStore(activations_dir(study, "concepts"), pooling(study), study.cfg.activations.shard_records,
                       records=sentences)


def stage_output_scores(study: Study, sae, scores: LatentScores) -> torch.Tensor:
    """Output scores of each emotion's top candidates (by AUROC), cached in scores/output.safetensors."""
    cfg = study.cfg.sae_directions
    path = study.run.path / "scores" / "output.safetensors"
    au = scores.auroc()
    n = min(cfg.output_candidates, scores.n_latents)
    candidates = sorted({int(i) for c, name in enumerate(scores.classes) if name != "neutral"
                         for i in au[c].topk(n).indices})
    key = key_of(study.key("scoring"), candidates, cfg.clamp_scale)
    output = study.run.reuse("output_scores", key, lambda: load_safetensors(path)["output"])
    if output is None:
        with study.run.stage("output_scores", key):
            output = output_scores(study.model, sae, scores, candidates, cfg.clamp_scale)
            save_safetensors(path, {"output": output})
    return output


def stage_sae_directions(study: Study, sae, scores: LatentScores, dense: EmotionDirections,
                         data: EvalData | None) -> dict[int, EmotionDirections]:
    """SAE-assembled directions for every k; evaluated like the dense ones unless ``data`` is None.
    Metrics, figures and directions of a k no longer configured are removed."""
    cfg = study.cfg.sae_directions
    output = stage_output_scores(study, sae, scores) if cfg.use_output_scores else None
    if output is not None:
        # what the latents that are read also write: share of each emotion's top-k by AUROC whose
        # clamping raises the emotion's own words
        au = scores.auroc()
        rows = [scores.index(n) for n in scores.classes if n != "neutral"]
        top = au[rows].topk(min(cfg.main_k, cfg.output_candidates, scores.n_latents), dim=1).indices
        study.run.record("sae", {"output_positive_fraction": float((output[rows].gather(1, top) > 0).float().mean())})
    else:
        study.run.drop("sae.output_positive_fraction")
    concepts = stage_concept_scores(study, sae)
    weight = study.cfg.directions.concept_weight
    out = {}
    for k in cfg.recipe.ks:
        where = study.run.path / "directions" / f"sae-k{k}"
        main = study.run.path / "directions" / "sae"
        key = key_of(study.key("scoring"), sae_fingerprint(sae), directions_key(dense), to_dict(cfg.recipe), k,
                     study.key("output_scores") if output is not None else None, k == cfg.main_k,
                     study.key("concept_scoring") if concepts is not None else None, weight)
        dirs = study.run.reuse(f"directions_sae_k{k}", key, lambda: (
            EmotionDirections.load(where), k != cfg.main_k or EmotionDirections.load(main))[0])
        if dirs is None:
            with study.run.stage(f"directions_sae_k{k}", key):
                dirs = build_sae(scores, sae.W_dec, k, study.layer, dense, cfg.recipe, output, concepts, weight)
                dirs.metadata.update({"model": model_identity(study.model).name, "corpus": study.corpus_key,
                                      "sae": study.run.manifest.get("sae", {}).get("path")})
                dirs.save(where)
                if k == cfg.main_k:
                    dirs.save(main)
        if data is not None:
            report_directions(study, dirs, data, f"sae.k{k}")
        cos = direction_cosines(dirs, dense)
        study.run.record(f"sae.k{k}", {"cosine_to_dense_median": float(np.median(list(cos.values())))})
        out[k] = dirs
    for name in [n for n in study.run.metrics.get("sae", {}) if n.startswith("k") and n[1:].isdigit()]:
        if int(name[1:]) not in cfg.recipe.ks:
            study.run.drop(f"sae.{name}")
            for stage in (f"directions_sae_{name}", f"evals_sae_{name}"):
                study.run.manifest["stages"].pop(stage, None)
                study.run.metrics.get("timings", {}).pop(f"{stage}_s", None)
            shutil.rmtree(study.run.path / "figures" / f"sae.{name}", ignore_errors=True)
            shutil.rmtree(study.run.path / "directions" / f"sae-{name}", ignore_errors=True)
    study.run.save()
    return out


def stage_cards(study: Study, sae, scores: LatentScores, dirs: EmotionDirections, tracker: Tracker) -> None:
    cfg = study.cfg.sae_directions
    path = study.run.path / "figures" / "cards.json"
    key = key_of(study.model_key, study.corpus_key, sae_fingerprint(sae), study.key("scoring"), directions_key(dirs),
                 cfg.cards_per_emotion, cfg.card_snippets)
    cards = study.run.reuse("feature_cards", key, lambda: (exists_or_raise(path.parent / "cards.html"), load_cards(path))[1])
    if cards is None:
        with study.run.stage("feature_cards", key):
            cards = build_cards(study.model, sae, scores, dirs, study.records, per_emotion=cfg.cards_per_emotion,
                                snippets=cfg.card_snippets)
            write_json(path, [c.to_dict() for c in cards])
            write_text(path.parent / "cards.html", cards_page(cards, f"Feature cards, layer {study.layer}"))
    tracker.log_table("latents", *stage_latent_table(study, sae, scores, dirs).flat())


def stage_latent_table(study: Study, sae, scores: LatentScores, dirs: EmotionDirections) -> LatentTable:
    """Every scored latent in one table (RUN/scores/latents.json and .safetensors): what the latent
    browser, `saefeatures latents` and `saefeatures latent` read."""
    key = key_of(study.model_key, study.corpus_key, sae_fingerprint(sae), study.key("scoring"), directions_key(dirs),
                 study.cfg.sae_directions.card_snippets)
    table = study.run.reuse("latent_table", key, lambda: LatentTable.load(study.run.path))
    if table is None:
        with study.run.stage("latent_table", key):
            table = build_latent_table(study.model, sae, scores, dirs, study.records,
                                       snippets=study.cfg.sae_directions.card_snippets)
            table.save(study.run.path)
    return table


def log_artifacts(study: Study, sae, tracker: Tracker) -> None:
    """The run's directions and its SAE as wandb artifacts (an SAE with no directory of its own,
    a pretrained one, is saved to a temporary one first)."""
    tracker.log_artifact("directions", "directions", study.run.path / "directions",
                         {"layer": study.layer, "corpus": study.corpus_key})
    where, meta = _sae_dir(sae, study), study.run.manifest.get("sae", {})
    if where:
        tracker.log_artifact("sae", "sae", where, meta)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        tracker.log_artifact("sae", "sae", tmp, meta)


def default_out_dir(cfg: RunConfig, layer: int) -> Path:
    """Where `train_run_sae` writes when not told: sae.train.out, else runs/sae/<model>-L<layer>."""
    return Path(cfg.sae.train.out or f"runs/sae/{short_model_name(cfg.model.name)}-L{layer}")


def short_model_name(name: str) -> str:
    """A model's name without its hub owner or parent directories (for default output paths)."""
    return Path(name).name if Path(name).exists() else name.split("/")[-1]


def train_run_sae(cfg: RunConfig, out_dir: str | Path | None = None, model: Any = None, resume: bool = True,
                  records: list | None = None) -> TrainResult:
    """Train (or resume, or reuse) the SAE of a run config at its layer: `sae.train_sae` with the
    config's model, corpus (sae.train.kinds and splits), tracking and sae.train settings.

    Example:
        >>> result = train_run_sae(load_config("configs/smollm2-135m.yaml"))
    """
    tcfg, mcfg = cfg.sae.train, cfg.model
    n_layers = model.cfg.n_layers if model is not None else None
    layer = resolve_layer(mcfg.layer, mcfg.name, n_layers)
    out = Path(out_dir or default_out_dir(cfg, layer))
    done = finished(out)
    if done is not None:
        log.info("SAE already trained: %s (delete it to retrain)", done.sae_dir)
        return done
    if model is None:
        model = load_model(mcfg.name, dtype=mcfg.dtype, device=mcfg.device)
    if records is None:
        records = [r for r in load_corpus(cfg.corpus.path, kinds=tcfg.kinds) if r.split in tcfg.splits]
    tracking = cfg.tracking
    use_wandb = tracking.wandb and tracking.mode != "disabled"
    return train_sae(model, records, tcfg, out, cfg.sae.hook or hook_name(layer), resume=resume,
                     corpus_label=cfg.corpus.path or "shipped", wandb_project=tracking.project if use_wandb else None,
                     wandb_mode=tracking.mode)


def prepare_sae(cfg: RunConfig, model: Any, run_dir: str | Path | None = None) -> Any:
    """The run's SAE: load (local/pretrained) or train-then-load, per ``cfg.sae``.

    A trained SAE goes to ``<run_dir>/sae-train`` (or sae.train.out); a finished training run is
    reused, an interrupted one resumes from its last checkpoint.

    Example:
        >>> sae = prepare_sae(load_config("configs/smollm2-135m.yaml"), model, "runs/study")
    """
    layer = resolve_layer(cfg.model.layer, cfg.model.name, model.cfg.n_layers)
    if cfg.sae.source == "train":
        out = cfg.sae.train.out or (str(Path(run_dir) / "sae-train") if run_dir else None)
        result = train_run_sae(cfg, out_dir=out, model=model)
        return load_sae(SAEConfig(**{**cfg.sae.__dict__, "source": "local", "path": str(result.sae_dir)}), model,
                        layer=layer)
    return load_sae(cfg.sae, model, layer=layer)


def evaluate_run_sae(cfg: RunConfig, sae_path: str | Path | None = None,
                     model: Any = None, save_to: str | Path | None = None) -> Any:
    """Evaluate the run config's SAE (or the one at `sae_path`) on the held-out corpus split.

    Example:
        >>> evals = evaluate_run_sae(load_config("configs/smollm2-135m.yaml"))
        >>> evals.metrics()["sae.explained_variance"]
    """
    mcfg, ecfg, tcfg = cfg.model, cfg.sae.eval, cfg.sae.train
    if model is None:
        model = load_model(mcfg.name, dtype=mcfg.dtype, device=mcfg.device)
    layer = resolve_layer(mcfg.layer, mcfg.name, model.cfg.n_layers)
    spec = SAEConfig(**{**cfg.sae.__dict__, "source": "local", "path": str(sae_path)}) \
        if sae_path else cfg.sae
    if spec.source == "train":
        out = default_out_dir(cfg, layer) / "sae"
        spec = SAEConfig(**{**spec.__dict__, "source": "local", "path": str(out)})
    sae = load_sae(spec, model, layer=layer)
    texts = held_out_texts(cfg.corpus.path, model.tokenizer, ecfg.split, tcfg.kinds,
                           tcfg.chat_fraction, tcfg.seed)
    t0 = time.perf_counter()
    evals = evaluate_sae(sae, model, texts, context_size=tcfg.context_size, config=ecfg)
    evals.extra.update(split=ecfg.split, corpus=cfg.corpus.path or "shipped",
                       wall_s=round(time.perf_counter() - t0, 1), inputs_key=evals_inputs_key(cfg))
    if save_to:
        evals.save(save_to)
    return evals


def evals_inputs_key(cfg: RunConfig) -> str:
    """What `evaluate_run_sae` measured on, besides the SAE: the corpus file's hash, the eval
    config and how held-out texts are rendered. Evals saved beside an SAE with the same key are
    reused by `saefeatures run` instead of measured again."""
    tcfg = cfg.sae.train
    corpus = Path(cfg.corpus.path) if cfg.corpus.path else DEFAULT_CORPUS
    return key_of(sha256_file(corpus), asdict(cfg.sae.eval), list(tcfg.kinds), tcfg.chat_fraction,
                  tcfg.seed, tcfg.context_size)

