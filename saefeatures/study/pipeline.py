"""`saefeatures run`: the whole study as a chain of cached stages over one run directory.

model -> corpus (and its model-free audit) -> SAE -> latent scores (whose forward pass also pools
the train split) -> activations (the rest) -> dense directions -> SAE directions -> evaluations
(geometry, detection, EmoBank; the reader test of an external story set) -> feature cards ->
probes and monitor -> steering -> report. Each stage writes its artifacts to the run directory under
a key of everything it was computed from (corpus content, model identity, SAE weights, upstream
artifacts, its config); a rerun skips a stage whose key is unchanged and whose outputs load,
recomputes one whose outputs are missing or corrupt, and an interrupted run resumes. A stage that
recomputes replaces its metrics section and its figures.

Under `torchrun` every rank runs `run_study`: the passes over the corpus (scoring and pooling,
EmoBank), the probes' cells and the steering cells are split over the ranks; rank 0 runs the other
stages, holds the lock and writes the run directory, metrics, report and wandb, while the others
wait for it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..activations import model_key
from ..corpus import load_corpus
from ..corpus_import import read_story_set
from ..directions import EmotionDirections
from ..distributed import World
from ..generation import GenerationConfig, Generator
from ..keys import key_of
from ..model_cache import sha256_file
from ..models import check_layer, hf_twin, known_shape, load_model, model_identity, resolve_layer
from ..report.page import write_report
from .config import RunConfig, to_dict
from .context import Study, exists_or_raise
from .machine import machine_info, stage_dtypes
from .preflight import check_model, check_run, check_sae_config, corpus_path
from .probe_stages import stage_monitor, stage_probes, stage_steering
from .rundir import RunDir, package_versions
from .sae_stages import (log_artifacts, stage_cards, stage_concept_scores, stage_sae, stage_sae_directions,
                         stage_scores)
from .stages import (eval_data, report_directions, stage_activations, stage_corpus, stage_concepts,
                     stage_corpus_audit, stage_dense, stage_emobank, stage_reader, stage_sweep)
from .tracking import Tracker, report_tables

log = logging.getLogger(__name__)


def smoke_reply(model, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy chat reply from the HF twin: a quick check that the model loads and generates."""
    gen = Generator(hf_twin(model), model.tokenizer, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    return gen.generate([prompt], seed=0)[0].strip()


def open_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None,
               world: World = World()) -> Study:
    """Check the config and the files it names (`check_run`), open (and lock) the run directory,
    then load the model (unless given; with a smoke reply) and the corpus. Checks come first,
    so bad input, a locked or an unwritable directory fail before any slow work. Under `torchrun`
    rank 0 opens and locks the directory first; the other ranks then open it as followers."""
    check_run(cfg, model)
    if not world.leader:
        world.sync("open", timeout_s=world.wait_s)
    run = RunDir.open(out) if world.leader else RunDir.open(out, follower=True)
    if world.leader:
        world.sync("open")
    # what describes this process is saved only with something computed (`rundir.VOLATILE_MANIFEST`)
    run.manifest.update({"config": to_dict(cfg), "config_path": config_path,
                         "packages": package_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with run.stage("model"):
        if model is None:
            model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    if known_shape(cfg.model.name) is None:  # a hub model: its depth and width are known now
        check_model(cfg, model)
        check_sae_config(cfg, model)
    identity = model_identity(model)
    layer = resolve_layer(cfg.model.layer, cfg.model.name, model.cfg.n_layers)
    for checked in {layer, *cfg.activations.layers}:
        check_layer(model, checked)
    run.manifest["model"] = identity.to_dict()
    run.manifest["machine"] = machine_info(model.cfg.device, stage_dtypes(cfg, model))
    run.replace("model", {"id": identity.name, "layer": layer})
    key = key_of(model_key(model), cfg.smoke_prompt)
    smoke = run.manifest.get("smoke", {})
    if world.leader and run.reuse("smoke", key, lambda: smoke["reply"]) is None:
        with run.stage("smoke", key):
            run.manifest["smoke"] = {"prompt": cfg.smoke_prompt, "reply": smoke_reply(model, cfg.smoke_prompt)}
    if world.leader:
        log.info("smoke check reply: %s", run.manifest["smoke"]["reply"])
    path = corpus_path(cfg)
    study = Study(cfg, run, model, layer, load_corpus(path), sha256_file(path)[:16], world)
    run.manifest["corpus"] = {"path": str(path), "sha256_16": study.corpus_key}
    stage_corpus(study)
    return study


def stage_report(study: Study, t0: float) -> Path:
    """report.html, rewritten unless every stage was skipped and the metrics are those it shows."""
    run = study.run
    path = run.path / "report.html"
    stages = {n: e.get("key") for n, e in sorted(run.manifest["stages"].items()) if n != "report"}
    key = key_of(stages, {k: v for k, v in run.metrics.items() if k != "timings"})
    if not run.recomputed and run.reuse("report", key, lambda: exists_or_raise(path)) is not None:
        return path
    with run.stage("report", key):
        write_report(run.path)
    set_total(run, t0)
    return write_report(run.path)  # again, with its own and the total time


def run_study(cfg: RunConfig, out: Path | str, config_path: str | None = None, model=None,
              world: World = World()) -> RunDir:
    """Run every stage of the study into ``out`` (reusing ``model`` if given); returns the run directory.

    Only stages whose inputs changed, or whose outputs are missing or corrupt, are computed; the
    log ends with one line naming the stages skipped and recomputed (also in the manifest's
    ``last_run``). The run directory is locked while this runs. With ``world`` (`init_world` under
    `torchrun`) every rank calls this; a rank that fails stops the others with `RankFailure`
    naming it and the stage.

    Example:
        >>> run = run_study(load_config("configs/smollm2-135m.yaml"), "runs/smollm2-135m")
        >>> run.metrics["dense"]["valence_r"]
    """
    t0 = time.perf_counter()
    if cfg.evals.reader_path:
        read_story_set(cfg.evals.reader_path)  # a bad story set fails now, not after the scoring pass
    study = None
    try:
        study = open_study(cfg, out, config_path, model, world)
        if not world.leader:
            follow_study(study)
            return study.run
        stage_corpus_audit(study)
        tracker = Tracker(cfg.tracking, study.run.path, to_dict(cfg), name=Path(out).name)
        with tracker:
            sae = stage_sae(study)
            scores = stage_scores(study, sae)  # also pools the train split for the activation stage
            stage_concept_scores(study, sae)  # also pools the concept sentences for stage_concepts
            acts = stage_activations(study)
            emobank = stage_emobank(study)
            data = eval_data(study, acts, emobank)
            concepts = stage_concepts(study)
            stage_sweep(study, acts, emobank, concepts)
            dense = stage_dense(study, acts, concepts)
            report_directions(study, dense, data, "dense")
            sae_dirs = stage_sae_directions(study, sae, scores, dense, data)
            main = sae_dirs.get(cfg.sae_directions.main_k) or next(iter(sae_dirs.values()))
            stage_reader(study, {"dense": dense, "sae": main})
            stage_cards(study, sae, scores, main, tracker)
            log_artifacts(study, sae, tracker)
            world.sync("directions", payload=next(k for k, d in sae_dirs.items() if d is main))
            stage_probes(study, dense, main)
            stage_monitor(study, dense)
            stage_steering(study, {"dense": dense, "sae": main}, sae)
            path = stage_report(study, t0)
            tracker.log_metrics(study.run.metrics)
            tracker.log_tables(report_tables(study.run.path, study.run.metrics, study.run.manifest))
            for png in sorted((study.run.path / "figures").rglob("*.png")):
                tracker.log_image(str(png.relative_to(study.run.path / "figures").with_suffix("")), png)
            tracker.log_html("report", path.read_text())
        study.run.manifest["last_run"] = {"skipped": study.run.skipped, "recomputed": study.run.recomputed,
                                          "seconds": round(time.perf_counter() - t0, 2)}
        study.run.save()
        log.info("%s", study.run.summary())
        world.sync("done")
    except Exception as e:
        world.fail(study.run.current if study is not None else "open", e)
        raise
    finally:
        if study is not None:
            study.run.close()
    return study.run


def follow_study(study: Study) -> None:
    """A rank other than 0: its share of the stages every rank runs, in step with rank 0 (which
    runs the rest and writes everything)."""
    world = study.world
    sae = stage_sae(study)
    stage_scores(study, sae)
    stage_activations(study)
    stage_emobank(study)
    k = world.sync("directions", timeout_s=world.wait_s)[0]
    where = study.run.path / "directions"
    dense, main = EmotionDirections.load(where / "dense"), EmotionDirections.load(where / f"sae-k{k}")
    stage_probes(study, dense, main)
    stage_steering(study, {"dense": dense, "sae": main}, sae)
    world.sync("done", timeout_s=world.wait_s)


def set_total(run: RunDir, t0: float) -> None:
    run.record("timings", {"total_s": round(time.perf_counter() - t0, 2)})
