"""`saefeatures run`: the whole study as a chain of cached stages over one run directory.

model -> corpus (and its model-free audit) -> SAE -> latent scores (whose forward pass also pools the train split) ->
activations (the rest) -> dense directions -> SAE directions -> evaluations (geometry, detection,
EmoBank; the reader test of an external story set) -> feature cards -> probes and monitor -> steering -> report. Each stage writes its
artifacts to the run directory under a key of everything it was computed from (corpus content,
model identity, SAE weights, upstream artifacts, its config); a rerun skips a stage whose key is
unchanged and whose outputs load, recomputes one whose outputs are missing or corrupt, and an
interrupted run resumes. A stage that recomputes replaces its metrics section and its figures.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .activations import PooledActivations, PooledStore, collect_pooled, hook_name, model_key, pooling_meta
from .audit import AuditConfig, audit_corpus
from .config import RunConfig
from .corpus import corpus_stats, load_corpus
from .corpus_import import read_story_set, story_set_key
from .directions import EmotionDirections, build_dense, build_sae
from .evals.emobank import EMOBANK_FILE, load_emobank
from .evals.reader import read_stories
from .evals.suite import DirectionReport, EvalData, evaluate_directions
from .files import load_safetensors, read_json, save_figure, save_safetensors, write_json, write_text
from .geometry import save_plots
from .machine import machine_info, stage_dtypes
from .models import check_layer, default_layer, known_shape, load_model, model_identity, sha256_file
from .preflight import check_model, check_run, check_sae_config, corpus_path
from .rundir import RunDir, key_of, package_versions
from .scoring import LatentScores, score_latents
from .tracking import Tracker

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
    """Hash of the corpus file's content."""

    @property
    def hook(self) -> str:
        return hook_name(self.layer, self.cfg.activations.hook)

    @property
    def layers(self) -> list[int]:
        """Layers pooled: the run's layer plus ``activations.layers`` (the report's layer sweep)."""
        return sorted({self.layer, *self.cfg.activations.layers})

    @property
    def hooks(self) -> list[str]:
        return [hook_name(layer, self.cfg.activations.hook) for layer in self.layers]

    @property
    def model_key(self) -> dict:
        return model_key(self.model)

    def key(self, stage: str) -> str | None:
        """The input key a stage last ran with (what downstream keys build on)."""
        return self.run.manifest["stages"].get(stage, {}).get("key")


def directions_key(dirs: EmotionDirections) -> str:
    """Everything directions are: names, vectors, centre, hook and latents."""
    return key_of(dirs.names, dirs.layer, dirs.hook, dirs.vectors, dirs.center, dirs.latents, dirs.recipe)


def sae_key(sae) -> str:
    """An SAE's hook, width and weights."""
    return key_of(sae.cfg.metadata.hook_name, sae.cfg.d_sae, dict(sae.state_dict()))


def fresh_dir(path: Path) -> Path:
    """``path`` emptied (a recomputed stage's figures replace, not join, the old ones)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _exists(*paths: Path) -> bool:
    """True, or FileNotFoundError naming the first missing file (a `RunDir.reuse` loader)."""
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing")
    return True


def smoke_reply(model, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy chat reply from the HF twin: a quick check that the model loads and generates."""
    from .generation import GenerationConfig, Generator
    from .models import hf_twin

    gen = Generator(hf_twin(model), model.tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return gen.generate([prompt], seed=0)[0].strip()


def stage_corpus(study: Study) -> None:
    stats = corpus_stats(study.records)
    study.run.replace("corpus", {"n_stories": stats["n_stories"], "n_neutral": stats["n_neutral"],
                                 "min_per_emotion": stats["min_per_emotion"], "n_emotions": stats["n_emotions"]})


def stage_corpus_audit(study: Study) -> None:
    """The model-free bag-of-words audit of the corpus (``corpus.bow_*``, corpus_audit.json)."""
    cfg = AuditConfig(test_split=study.cfg.evals.split)
    path = study.run.path / "corpus_audit.json"
    key = key_of(study.corpus_key, config_mod.to_dict(cfg))
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
    key = key_of(story_set_key(ev.reader_path), ev.reader_per_emotion, config_mod.to_dict(study.cfg.activations),
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


def pooling(study: Study, cfg=None) -> dict:
    """How the run pools activations (model, hooks, dtype, truncation; ``cfg``: activations or scoring)."""
    return pooling_meta(study.model, study.hooks, cfg or study.cfg.activations)


def activations_dir(study: Study, name: str = "corpus") -> Path:
    """Where pooled activations go: one directory per model and pooling setting, so a changed
    config pools afresh beside the old rows instead of mixing with them (rows whose record text
    changed are recomputed within a directory: see `PooledStore`)."""
    return study.run.path / "activations" / f"{name}-L{study.layer}-{key_of(pooling(study))[:8]}"


def stage_activations(study: Study) -> PooledActivations:
    """Pooled activations of the train and evaluation splits (rows the scoring pass already
    stored are read back, not recomputed)."""
    cfg = study.cfg.activations
    key = key_of(study.corpus_key, study.model_key, study.layers, config_mod.to_dict(cfg))
    needed = [r for r in study.records if r.split in ("train", study.cfg.evals.split)]
    out = activations_dir(study)
    acts = study.run.reuse("activations", key, lambda: PooledStore(out, pooling(study), cfg.shard_records,
                                                                   records=needed).read([r.id for r in needed]))
    if acts is None:
        with study.run.stage("activations", key):
            acts = collect_pooled(study.model, needed, cfg, out, layers=study.layers)
    return acts


def shared_store(study: Study, sae) -> PooledStore | None:
    """The activation stage's store, for the scoring pass to fill as it goes: one forward pass
    over the train split serves both stages when they pool the same hook the same way."""
    meta = pooling(study)
    if sae.cfg.metadata.hook_name != study.hook or pooling(study, study.cfg.scoring) != meta:
        return None
    return PooledStore(activations_dir(study), meta, study.cfg.activations.shard_records, records=study.records)


def emobank_key(study: Study) -> str:
    ev = study.cfg.evals
    path = Path(ev.emobank_path) if ev.emobank_path else EMOBANK_FILE
    return key_of(sha256_file(path) if path.is_file() else str(path), ev.emobank_limit, study.model_key,
                  study.layers, config_mod.to_dict(study.cfg.activations))


def stage_emobank(study: Study) -> tuple[PooledActivations, np.ndarray, np.ndarray]:
    """Pooled activations of the EmoBank sentences at every layer, and their human valence and arousal."""
    ev = study.cfg.evals
    sentences = load_emobank(ev.emobank_path, limit=ev.emobank_limit)
    out = activations_dir(study, "emobank")
    key = emobank_key(study)
    cfg = study.cfg.activations
    acts = study.run.reuse("emobank_activations", key, lambda: PooledStore(
        out, pooling(study), cfg.shard_records, records=sentences).read([s.id for s in sentences]))
    if acts is None:
        with study.run.stage("emobank_activations", key):
            acts = collect_pooled(study.model, sentences, cfg, out, layers=study.layers, desc="emobank")
    return acts, np.array([s.valence for s in sentences]), np.array([s.arousal for s in sentences])


def eval_data(study: Study, acts: PooledActivations,
              emobank: tuple[PooledActivations, np.ndarray, np.ndarray]) -> EvalData:
    split = study.cfg.evals.split
    test = [r for r in study.records if r.split == split and r.emotion != "neutral"]
    eb_acts, eb_v, eb_a = emobank
    return EvalData(acts.subset([r.id for r in test])[study.hook], [r.emotion for r in test], eb_acts[study.hook],
                    eb_v, eb_a)


def eval_key(study: Study) -> str:
    """What evaluations of directions read besides the directions: activations, EmoBank, config."""
    return key_of(study.key("activations"), study.key("emobank_activations"), config_mod.to_dict(study.cfg.evals))


def stage_sweep(study: Study, acts: PooledActivations,
                emobank: tuple[PooledActivations, np.ndarray, np.ndarray]) -> None:
    """The dense recipe at every pooled layer, one table (``sweep.json``, ``layer_sweep.L*`` metrics)."""
    from .layer_sweep import sweep_rows

    if len(study.layers) < 2:
        return
    path = study.run.path / "sweep.json"
    key = key_of(eval_key(study), study.layers, config_mod.to_dict(study.cfg.directions))
    if study.run.reuse("layer_sweep", key, lambda: read_json(path)) is not None:
        return
    with study.run.stage("layer_sweep", key):
        rows = sweep_rows(study.cfg, study.layers, study.records, acts, *emobank)
        write_json(path, rows)
        study.run.replace("layer_sweep", {f"L{r['layer']}": {k: v for k, v in r.items() if k != "layer"}
                                          for r in rows})


def stage_dense(study: Study, acts: PooledActivations) -> EmotionDirections:
    train = [r for r in study.records if r.split == "train" and r.emotion != "neutral"]
    neutral = [r for r in study.records if r.split == "train" and r.emotion == "neutral"]
    out = study.run.path / "directions" / "dense"
    key = key_of(study.key("activations"), study.layer, config_mod.to_dict(study.cfg.directions))
    dirs = study.run.reuse("directions_dense", key, lambda: EmotionDirections.load(out))
    if dirs is None:
        with study.run.stage("directions_dense", key):
            dirs = build_dense(acts.subset([r.id for r in train])[study.hook], [r.emotion for r in train],
                               acts.subset([r.id for r in neutral])[study.hook], study.layer,
                               study.cfg.directions, study.hook)
            dirs.metadata.update({"model": model_identity(study.model).name, "corpus": study.corpus_key})
            dirs.save(out)
    return dirs


def report_directions(study: Study, dirs: EmotionDirections, data: EvalData, section: str) -> None:
    """Geometry, detection and EmoBank of ``dirs``: the ``section`` of metrics and ``figures/section/``."""
    name = f"evals_{section.replace('.', '_')}"
    figs = study.run.path / "figures" / section
    key = key_of(directions_key(dirs), eval_key(study), section)
    if study.run.reuse(name, key, lambda: (read_json(figs / "detection.json"), read_json(figs / "geometry.json"),
                                           _exists(figs / "geometry.png"))) is not None:
        return
    with study.run.stage(name, key):
        rep: DirectionReport = evaluate_directions(dirs, data)
        study.run.replace(section, rep.metrics)
        save_plots(rep.geometry, fresh_dir(figs), title=f"{section} directions, layer {dirs.layer}")
        write_json(figs / "detection.json", {"metrics": rep.detection.metrics(),
                                             "per_emotion": rep.detection.per_emotion})
        write_json(figs / "geometry.json", {"names": rep.geometry.names, "scores": rep.geometry.scores,
                                            "explained": rep.geometry.explained, "clusters": rep.geometry.clusters})


def open_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None) -> Study:
    """Check the config and the files it names (`check_run`), open (and lock) the run directory,
    then load the model (unless given; with a smoke reply) and the corpus. Checks come first,
    so bad input, a locked or an unwritable directory fail before any slow work."""
    check_run(cfg, model)
    run = RunDir.open(out)
    run.manifest.update({"config": config_mod.to_dict(cfg), "config_path": config_path,
                         "packages": package_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with run.stage("model"):
        if model is None:
            model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    if known_shape(cfg.model.name) is None:  # a hub model: its depth and width are known now
        check_model(cfg, model)
        check_sae_config(cfg, model)
    identity = model_identity(model)
    layer = cfg.model.layer if cfg.model.layer is not None else default_layer(cfg.model.name, model.cfg.n_layers)
    for checked in {layer, *cfg.activations.layers}:
        check_layer(model, checked)
    run.manifest["model"] = identity.to_dict()
    run.manifest["machine"] = machine_info(model.cfg.device, stage_dtypes(cfg, model))
    run.replace("model", {"id": identity.name, "layer": layer})
    key = key_of(model_key(model), cfg.smoke_prompt)
    smoke = run.manifest.get("smoke", {})
    if run.reuse("smoke", key, lambda: smoke["reply"]) is None:
        with run.stage("smoke", key):
            run.manifest["smoke"] = {"prompt": cfg.smoke_prompt, "reply": smoke_reply(model, cfg.smoke_prompt)}
    log.info("smoke check reply: %s", run.manifest["smoke"]["reply"])
    path = corpus_path(cfg)
    study = Study(cfg, run, model, layer, load_corpus(path), sha256_file(path)[:16])
    run.manifest["corpus"] = {"path": str(path), "sha256_16": study.corpus_key}
    stage_corpus(study)
    return study


def stage_sae(study: Study):
    """Load (or train, then load) the SAE per the config, and record its quality on held-out text."""
    from .sae_training import evaluate_run_sae
    from .saes import SAEEvals, prepare_sae

    with study.run.stage("sae_load"):
        sae = prepare_sae(study.cfg, study.model, study.run.path)
    path = study.run.path / "sae_evals.json"
    key = key_of(study.corpus_key, study.model_key, study.layer, sae_key(sae), config_mod.to_dict(study.cfg.sae.eval))
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
    from .sae_training import evals_inputs_key

    where = _sae_dir(sae, study)
    recorded = Path(where) / "evals.json" if where else None
    if recorded is None or not recorded.is_file():
        return None
    extra = read_json(recorded).get("extra", {})
    return recorded if extra.get("inputs_key") == evals_inputs_key(study.cfg) else None


def _sae_dir(sae, study: Study) -> str | None:
    from .saes import shipped_sae_dir

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
    key = key_of(study.corpus_key, study.model_key, study.layer, sae_key(sae), config_mod.to_dict(cfg))
    scores = study.run.reuse("scoring", key, lambda: LatentScores.load(out))
    if scores is None:
        with study.run.stage("scoring", key):
            store = shared_store(study, sae)
            held_out = [r for r in study.records if r.split == study.cfg.evals.split]
            score_latents(study.model, sae, records, cfg, pooled=store,
                          scale_records=held_out if store is not None and held_out else None).save(out)
        scores = LatentScores.load(out)
    return scores


def stage_output_scores(study: Study, sae, scores: LatentScores) -> torch.Tensor:
    """Output scores of each emotion's top candidates (by AUROC), cached in scores/output.safetensors."""
    from .latent_effects import output_scores

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
    from .geometry import direction_cosines

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
    out = {}
    for k in cfg.recipe.ks:
        where = study.run.path / "directions" / f"sae-k{k}"
        main = study.run.path / "directions" / "sae"
        key = key_of(study.key("scoring"), sae_key(sae), directions_key(dense), config_mod.to_dict(cfg.recipe), k,
                     study.key("output_scores") if output is not None else None, k == cfg.main_k)
        dirs = study.run.reuse(f"directions_sae_k{k}", key, lambda: (
            EmotionDirections.load(where), k != cfg.main_k or EmotionDirections.load(main))[0])
        if dirs is None:
            with study.run.stage(f"directions_sae_k{k}", key):
                dirs = build_sae(scores, sae.W_dec, k, study.layer, dense, cfg.recipe, output)
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
    from .feature_cards import build_cards, cards_page, cards_tables, load_cards

    cfg = study.cfg.sae_directions
    path = study.run.path / "figures" / "cards.json"
    key = key_of(study.model_key, study.corpus_key, sae_key(sae), study.key("scoring"), directions_key(dirs),
                 cfg.cards_per_emotion, cfg.card_snippets)
    cards = study.run.reuse("feature_cards", key, lambda: (_exists(path.parent / "cards.html"), load_cards(path))[1])
    if cards is None:
        with study.run.stage("feature_cards", key):
            cards = build_cards(study.model, sae, scores, dirs, study.records, per_emotion=cfg.cards_per_emotion,
                                snippets=cfg.card_snippets)
            write_json(path, [c.to_dict() for c in cards])
            write_text(path.parent / "cards.html", cards_page(cards, f"Feature cards, layer {study.layer}"))
    for name, (cols, rows) in cards_tables(cards).items():
        tracker.log_table(f"feature_cards/{name}", cols, rows)


def stage_probes(study: Study, dense: EmotionDirections, sae_dirs: EmotionDirections | None = None) -> None:
    """The context probes on the dense directions (``probes.*``); the Tylenol probe also on the
    SAE-assembled ones (``probes.sae_tylenol_*``)."""
    import matplotlib.pyplot as plt

    from .evals.probes import probe_metrics, run_probes, tylenol_figure

    figs = study.run.path / "figures" / "probes"
    key = key_of(study.model_key, directions_key(dense), None if sae_dirs is None else directions_key(sae_dirs),
                 config_mod.to_dict(study.cfg.probes))
    if study.run.reuse("probes", key, lambda: (read_json(figs / "probes.json"),
                                               _exists(figs / "tylenol.png"))) is not None:
        return
    with study.run.stage("probes", key):
        results = run_probes(study.model, dense, study.cfg.probes, sae_dirs)
        write_json(fresh_dir(figs) / "probes.json", results)
        study.run.replace("probes", probe_metrics(results))
        fig = tylenol_figure(results["tylenol"], results["danger"])
        save_figure(figs / "tylenol.png", fig, dpi=100)
        plt.close(fig)


MONITOR_EXAMPLES = ("tylenol_16000mg", "distress_then_calm_reply", "frightened_story_then_request")


def stage_monitor(study: Study, dense: EmotionDirections) -> None:
    """Calibrate alarms on neutral test texts and render example traces for the report."""
    import matplotlib.pyplot as plt

    from .evals.probes import DISTRESS, FRIGHTENED_STORY, NEUTRAL_REQUEST, TYLENOL_TEMPLATES
    from .monitor import Calibration, alarms, calibrate, trace_chat, trace_figure, trace_html

    cfg = study.cfg.monitor
    figs = study.run.path / "figures" / "monitor"
    calib_path = study.run.path / "directions" / "dense" / "calibration.json"
    neutral = [r.text for r in study.records if r.emotion == "neutral" and r.split == "test"][: cfg.calibration_texts]
    key = key_of(study.model_key, directions_key(dense), neutral, config_mod.to_dict(cfg))
    if study.run.reuse("monitor", key, lambda: (Calibration.load(calib_path), _exists(
            *(figs / f"{n}.{ext}" for n in MONITOR_EXAMPLES for ext in ("png", "html"))))) is not None:
        return
    with study.run.stage("monitor", key):
        fresh_dir(figs)
        calib = calibrate(study.model, dense, neutral)
        calib.save(calib_path)
        examples = {
            "tylenol_16000mg": [{"role": "user", "content": TYLENOL_TEMPLATES[0].format(dose=16000)}],
            "distress_then_calm_reply": DISTRESS,
            "frightened_story_then_request": [{"role": "user", "content": FRIGHTENED_STORY},
                                              {"role": "assistant", "content": "Mara is alone on dark stairs."},
                                              {"role": "user", "content": NEUTRAL_REQUEST}],
        }
        fired = {}
        for name, chat in examples.items():
            trace = trace_chat(study.model, dense, chat)
            fig = trace_figure(trace, cfg.emotions, calib, window=cfg.window)
            save_figure(figs / f"{name}.png", fig, dpi=90)
            plt.close(fig)
            write_text(figs / f"{name}.html", trace_html(trace, cfg.emotions[0], calib))
            fired[name] = len(alarms(trace, calib, cfg.emotions, cfg.alarm_z, cfg.window))
        study.run.replace("monitor", {"calibration_tokens": float(calib.n_tokens),
                                      **{f"alarms_{k}": float(v) for k, v in fired.items()}})


def stage_report(study: Study, t0: float) -> Path:
    """report.html, rewritten unless every stage was skipped and the metrics are those it shows."""
    from .report import write_report

    run = study.run
    path = run.path / "report.html"
    stages = {n: e.get("key") for n, e in sorted(run.manifest["stages"].items()) if n != "report"}
    key = key_of(stages, {k: v for k, v in run.metrics.items() if k != "timings"})
    if not run.recomputed and run.reuse("report", key, lambda: _exists(path)) is not None:
        return path
    with run.stage("report", key):
        write_report(run.path)
    set_total(run, t0)
    return write_report(run.path)  # again, with its own and the total time


def run_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None) -> RunDir:
    """Run every stage of the study into ``out`` (reusing ``model`` if given); returns the run directory.

    Only stages whose inputs changed, or whose outputs are missing or corrupt, are computed; the
    log ends with one line naming the stages skipped and recomputed (also in the manifest's
    ``last_run``). The run directory is locked while this runs.

    Example:
        >>> run = run_study(load_config("configs/smollm2-135m.yaml"), "runs/smollm2-135m")
        >>> run.metrics["dense"]["valence_r"]
    """
    from .evals.steering import stage_steering

    t0 = time.perf_counter()
    if cfg.evals.reader_path:
        read_story_set(cfg.evals.reader_path)  # a bad story set fails now, not after the scoring pass
    study = open_study(cfg, out, config_path, model)
    try:
        stage_corpus_audit(study)
        tracker = Tracker(cfg.tracking, study.run.path, config_mod.to_dict(cfg), name=Path(out).name)
        with tracker:
            sae = stage_sae(study)
            scores = stage_scores(study, sae)  # also pools the train split for the activation stage
            acts = stage_activations(study)
            emobank = stage_emobank(study)
            data = eval_data(study, acts, emobank)
            stage_sweep(study, acts, emobank)
            dense = stage_dense(study, acts)
            report_directions(study, dense, data, "dense")
            sae_dirs = stage_sae_directions(study, sae, scores, dense, data)
            main = sae_dirs.get(cfg.sae_directions.main_k) or next(iter(sae_dirs.values()))
            stage_reader(study, {"dense": dense, "sae": main})
            stage_cards(study, sae, scores, main, tracker)
            stage_probes(study, dense, main)
            stage_monitor(study, dense)
            stage_steering(study, {"dense": dense, "sae": main}, sae)
            path = stage_report(study, t0)
            tracker.log_metrics(study.run.metrics)
            for png in sorted((study.run.path / "figures").rglob("*.png")):
                tracker.log_image(str(png.relative_to(study.run.path / "figures").with_suffix("")), png)
            tracker.log_html("report", path.read_text())
        study.run.manifest["last_run"] = {"skipped": study.run.skipped, "recomputed": study.run.recomputed,
                                          "seconds": round(time.perf_counter() - t0, 2)}
        study.run.save()
        log.info("%s", study.run.summary())
    finally:
        study.run.close()
    return study.run


def set_total(run: RunDir, t0: float) -> None:
    run.record("timings", {"total_s": round(time.perf_counter() - t0, 2)})
