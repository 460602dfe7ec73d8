"""`saefeatures run`: the whole study as a chain of cached stages over one run directory.

model -> corpus -> SAE -> latent scores (whose forward pass also pools the train split) ->
activations (the rest) -> dense directions -> SAE directions -> evaluations (geometry, detection,
EmoBank) -> feature cards -> probes and monitor -> steering -> report. Each stage writes its artifacts to the run directory; a rerun skips stages whose inputs
did not change, and an interrupted one resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config as config_mod
from .activations import PooledActivations, PooledStore, collect_pooled, hook_name, pooling_meta
from .config import RunConfig
from .corpus import corpus_stats, load_corpus
from .directions import EmotionDirections, build_dense, build_sae
from .evals.emobank import load_emobank
from .evals.suite import DirectionReport, EvalData, evaluate_directions
from .geometry import save_plots
from .models import check_layer, default_layer, known_shape, load_model, model_identity, resolve_dtype, sha256_file
from .preflight import check_model, check_run, check_sae_config, corpus_path
from .rundir import RunDir, key_of, package_versions, write_json
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


def smoke_reply(model, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy chat reply from the HF twin: a quick check that the model loads and generates."""
    from .generation import GenerationConfig, Generator
    from .models import hf_twin

    gen = Generator(hf_twin(model), model.tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return gen.generate([prompt], seed=0)[0].strip()


def stage_corpus(study: Study) -> None:
    stats = corpus_stats(study.records)
    study.run.record("corpus", {"n_stories": stats["n_stories"], "n_neutral": stats["n_neutral"],
                                "min_per_emotion": stats["min_per_emotion"], "n_emotions": stats["n_emotions"]})


def pooling(study: Study, cfg=None) -> dict:
    """How the run pools activations (hooks, dtype, truncation; ``cfg``: activations or scoring)."""
    cfg = cfg or study.cfg.activations
    return pooling_meta(study.hooks, cfg, resolve_dtype(cfg.dtype, study.model.cfg.device))


def activations_dir(study: Study, name: str = "corpus") -> Path:
    """Where pooled activations go: one directory per pooling setting, so a changed config pools
    afresh beside the old rows instead of mixing with them."""
    return study.run.path / "activations" / f"{name}-L{study.layer}-{key_of(pooling(study))[:8]}"


def stage_activations(study: Study) -> PooledActivations:
    """Pooled activations of the train and evaluation splits (rows the scoring pass already
    stored are read back, not recomputed)."""
    cfg = study.cfg.activations
    key = key_of(study.corpus_key, model_identity(study.model).sha256, study.layer, config_mod.to_dict(cfg))
    needed = [r for r in study.records if r.split in ("train", study.cfg.evals.split)]
    with study.run.stage("activations", key):
        acts = collect_pooled(study.model, needed, cfg, activations_dir(study), layers=study.layers)
    return acts


def shared_store(study: Study, sae) -> PooledStore | None:
    """The activation stage's store, for the scoring pass to fill as it goes: one forward pass
    over the train split serves both stages when they pool the same hook the same way."""
    meta = pooling(study)
    if sae.cfg.metadata.hook_name != study.hook or pooling(study, study.cfg.scoring) != meta:
        return None
    return PooledStore(activations_dir(study), meta, study.cfg.activations.shard_records)


def stage_emobank(study: Study) -> tuple[PooledActivations, np.ndarray, np.ndarray]:
    """Pooled activations of the EmoBank sentences at every layer, and their human valence and arousal."""
    ev = study.cfg.evals
    sentences = load_emobank(ev.emobank_path, limit=ev.emobank_limit)
    out = activations_dir(study, "emobank")
    key = key_of(ev.emobank_path, ev.emobank_limit, study.layers, config_mod.to_dict(study.cfg.activations))
    with study.run.stage("emobank_activations", key):
        acts = collect_pooled(study.model, sentences, study.cfg.activations, out, layers=study.layers, desc="emobank")
    return acts, np.array([s.valence for s in sentences]), np.array([s.arousal for s in sentences])


def eval_data(study: Study, acts: PooledActivations,
              emobank: tuple[PooledActivations, np.ndarray, np.ndarray]) -> EvalData:
    split = study.cfg.evals.split
    test = [r for r in study.records if r.split == split and r.emotion != "neutral"]
    eb_acts, eb_v, eb_a = emobank
    return EvalData(acts.subset([r.id for r in test])[study.hook], [r.emotion for r in test], eb_acts[study.hook],
                    eb_v, eb_a)


def stage_sweep(study: Study, acts: PooledActivations,
                emobank: tuple[PooledActivations, np.ndarray, np.ndarray]) -> None:
    """The dense recipe at every pooled layer, one table (``sweep.json``, ``layer_sweep.L*`` metrics)."""
    from .layer_sweep import sweep_rows

    if len(study.layers) < 2:
        return
    with study.run.stage("layer_sweep"):
        rows = sweep_rows(study.cfg, study.layers, study.records, acts, *emobank)
        write_json(study.run.path / "sweep.json", rows)
        study.run.record("layer_sweep", {f"L{r['layer']}": {k: v for k, v in r.items() if k != "layer"}
                                         for r in rows})


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


def open_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None) -> Study:
    """Check the config and the files it names (`check_run`), load the model (unless given; with a
    smoke reply) and the corpus, and open the run directory."""
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


def stage_sae(study: Study):
    """Load (or train, then load) the SAE per the config, and record its quality on held-out text."""
    from .sae_training import evaluate_run_sae
    from .saes import SAEEvals, prepare_sae

    with study.run.stage("sae_load"):
        sae = prepare_sae(study.cfg, study.model, study.run.path)
    path = study.run.path / "sae_evals.json"
    key = key_of(study.corpus_key, study.layer, sae.cfg.d_sae, float(sae.W_dec.detach().double().sum()),
                 config_mod.to_dict(study.cfg.sae.eval))
    if not study.run.is_done("sae_eval", key, (path,)):
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
    extra = json.loads(recorded.read_text()).get("extra", {})
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
    key = key_of(study.corpus_key, study.layer, float(sae.W_dec.detach().double().sum()), config_mod.to_dict(cfg))
    if not study.run.is_done("scoring", key, (out / "scores.json",)):
        with study.run.stage("scoring", key):
            store = shared_store(study, sae)
            held_out = [r for r in study.records if r.split == study.cfg.evals.split]
            score_latents(study.model, sae, records, cfg, pooled=store,
                          scale_records=held_out if store is not None and held_out else None).save(out)
    return LatentScores.load(out)


def stage_output_scores(study: Study, sae, scores: LatentScores) -> torch.Tensor:
    """Output scores of each emotion's top candidates (by AUROC), cached in scores/output.safetensors."""
    from safetensors.torch import load_file, save_file

    from .latent_effects import output_scores

    cfg = study.cfg.sae_directions
    path = study.run.path / "scores" / "output.safetensors"
    au = scores.auroc()
    n = min(cfg.output_candidates, scores.n_latents)
    candidates = sorted({int(i) for c, name in enumerate(scores.classes) if name != "neutral"
                         for i in au[c].topk(n).indices})
    key = key_of(study.run.manifest["stages"].get("scoring", {}).get("key"), candidates, cfg.clamp_scale)
    if not study.run.is_done("output_scores", key, (path,)):
        with study.run.stage("output_scores", key):
            save_file({"output": output_scores(study.model, sae, scores, candidates, cfg.clamp_scale)}, str(path))
    return load_file(str(path))["output"]


def stage_sae_directions(study: Study, sae, scores: LatentScores, dense: EmotionDirections,
                         data: EvalData | None) -> dict[int, EmotionDirections]:
    """SAE-assembled directions for every k; evaluated like the dense ones unless ``data`` is None."""
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
    out = {}
    for k in cfg.recipe.ks:
        with study.run.stage(f"directions_sae_k{k}"):
            dirs = build_sae(scores, sae.W_dec, k, study.layer, dense, cfg.recipe, output)
            dirs.metadata.update({"model": model_identity(study.model).name, "corpus": study.corpus_key,
                                  "sae": study.run.manifest.get("sae", {}).get("path")})
            dirs.save(study.run.path / "directions" / f"sae-k{k}")
            if k == cfg.main_k:
                dirs.save(study.run.path / "directions" / "sae")
        if data is not None:
            report_directions(study, dirs, data, f"sae.k{k}")
        cos = direction_cosines(dirs, dense)
        study.run.record(f"sae.k{k}", {"cosine_to_dense_median": float(np.median(list(cos.values())))})
        out[k] = dirs
    return out


def stage_cards(study: Study, sae, scores: LatentScores, dirs: EmotionDirections, tracker: Tracker) -> None:
    from .feature_cards import build_cards, cards_page, cards_tables

    cfg = study.cfg.sae_directions
    path = study.run.path / "figures" / "cards.json"
    with study.run.stage("feature_cards"):
        cards = build_cards(study.model, sae, scores, dirs, study.records, per_emotion=cfg.cards_per_emotion,
                            snippets=cfg.card_snippets)
        write_json(path, [c.to_dict() for c in cards])
        (path.parent / "cards.html").write_text(cards_page(cards, f"Feature cards, layer {study.layer}"))
        for name, (cols, rows) in cards_tables(cards).items():
            tracker.log_table(f"feature_cards/{name}", cols, rows)


def stage_probes(study: Study, dense: EmotionDirections, sae_dirs: EmotionDirections | None = None) -> None:
    """The context probes on the dense directions (``probes.*``); the Tylenol probe also on the
    SAE-assembled ones (``probes.sae_tylenol_*``)."""
    import matplotlib.pyplot as plt

    from .evals.probes import probe_metrics, run_probes, tylenol_figure

    figs = study.run.path / "figures" / "probes"
    figs.mkdir(parents=True, exist_ok=True)
    with study.run.stage("probes"):
        results = run_probes(study.model, dense, study.cfg.probes, sae_dirs)
        write_json(figs / "probes.json", results)
        study.run.record("probes", probe_metrics(results))
        fig = tylenol_figure(results["tylenol"], results["danger"])
        fig.savefig(figs / "tylenol.png", dpi=100)
        plt.close(fig)


def stage_monitor(study: Study, dense: EmotionDirections) -> None:
    """Calibrate alarms on neutral test texts and render example traces for the report."""
    import matplotlib.pyplot as plt

    from .evals.probes import DISTRESS, FRIGHTENED_STORY, NEUTRAL_REQUEST, TYLENOL_TEMPLATES
    from .monitor import alarms, calibrate, trace_chat, trace_figure, trace_html

    cfg = study.cfg.monitor
    figs = study.run.path / "figures" / "monitor"
    figs.mkdir(parents=True, exist_ok=True)
    with study.run.stage("monitor"):
        neutral = [r.text for r in study.records if r.emotion == "neutral" and r.split == "test"][: cfg.calibration_texts]
        calib = calibrate(study.model, dense, neutral)
        calib.save(study.run.path / "directions" / "dense" / "calibration.json")
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
            fig.savefig(figs / f"{name}.png", dpi=90)
            plt.close(fig)
            (figs / f"{name}.html").write_text(trace_html(trace, cfg.emotions[0], calib))
            fired[name] = len(alarms(trace, calib, cfg.emotions, cfg.alarm_z, cfg.window))
        study.run.record("monitor", {"calibration_tokens": float(calib.n_tokens),
                                     **{f"alarms_{k}": float(v) for k, v in fired.items()}})


def run_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None) -> RunDir:
    """Run every stage of the study into ``out`` (reusing ``model`` if given); returns the run directory.

    Example:
        >>> run = run_study(load_config("configs/smollm2-135m.yaml"), "runs/smollm2-135m")
        >>> run.metrics["dense"]["valence_r"]
    """
    from .evals.steering import stage_steering
    from .report import write_report

    t0 = time.perf_counter()
    study = open_study(cfg, out, config_path, model)
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
        stage_cards(study, sae, scores, main, tracker)
        stage_probes(study, dense, main)
        stage_monitor(study, dense)
        stage_steering(study, {"dense": dense, "sae": main}, sae)
        with study.run.stage("report"):
            path = write_report(study.run.path)
        set_total(study.run, t0)
        write_report(study.run.path)
        tracker.log_metrics(study.run.metrics)
        for png in sorted((study.run.path / "figures").rglob("*.png")):
            tracker.log_image(str(png.relative_to(study.run.path / "figures").with_suffix("")), png)
        tracker.log_html("report", path.read_text())
    return study.run


def set_total(run: RunDir, t0: float) -> None:
    run.record("timings", {"total_s": round(time.perf_counter() - t0, 2)})
