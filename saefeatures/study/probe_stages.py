"""The behaviour stages of `saefeatures run`: context probes, the monitor's example traces, and the
steering evaluations."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from ..activations import model_key
from ..directions import EmotionDirections
from ..evals.probes import DISTRESS, FRIGHTENED_STORY, NEUTRAL_REQUEST, TYLENOL_TEMPLATES, probe_metrics, run_probes
from ..evals.steering_suite import SteeringResult, run_steering_evals
from ..files import read_json, save_figure, write_json, write_text
from ..keys import key_of
from ..monitor import Calibration, alarms, calibrate, trace_chat
from ..report.monitor import trace_figure, trace_html
from ..report.probes import tylenol_figure
from ..report.steering import save_steering_plots
from ..sae import sae_fingerprint
from ..stats import N_RESAMPLES, SEED
from .config import to_dict
from .context import Study, directions_key, exists_or_raise, fresh_dir, reuse_together
from .tracking import log_steering_wandb

log = logging.getLogger(__name__)


def stage_probes(study: Study, dense: EmotionDirections, sae_dirs: EmotionDirections | None = None) -> None:
    """The context probes on the dense directions (``probes.*``); the Tylenol probe also on the
    SAE-assembled ones (``probes.sae_tylenol_*``). Every rank runs it: the probes' cells are split
    over the ranks (`run_probes`), and rank 0 writes the results, metrics and figure."""
    import matplotlib.pyplot as plt

    figs = study.run.path / "figures" / "probes"
    key = key_of(study.model_key, directions_key(dense), None if sae_dirs is None else directions_key(sae_dirs),
                 to_dict(study.cfg.probes), N_RESAMPLES, SEED)
    if reuse_together(study, "probes", key, lambda: (read_json(figs / "probes.json"),
                                                     exists_or_raise(figs / "tylenol.png")),
                      others=lambda: True) is not None:
        return
    if not study.world.leader:  # its share of the cells, handed to rank 0
        study.run.current = "probes"  # the stage its failure names
        run_probes(study.model, dense, study.cfg.probes, sae_dirs, study.world)
        return
    with study.run.stage("probes", key):
        results = run_probes(study.model, dense, study.cfg.probes, sae_dirs, study.world)
        write_json(fresh_dir(figs) / "probes.json", results)
        study.run.replace("probes", probe_metrics(results))
        fig = tylenol_figure(results["tylenol"], results["danger"])
        save_figure(figs / "tylenol.png", fig, dpi=100)
        plt.close(fig)


MONITOR_EXAMPLES = ("tylenol_16000mg", "distress_then_calm_reply", "frightened_story_then_request")


def stage_monitor(study: Study, dense: EmotionDirections) -> None:
    """Calibrate alarms on neutral test texts and render example traces for the report."""
    import matplotlib.pyplot as plt

    cfg = study.cfg.monitor
    figs = study.run.path / "figures" / "monitor"
    calib_path = study.run.path / "directions" / "dense" / "calibration.json"
    neutral = [r.text for r in study.records if r.emotion == "neutral" and r.split == "test"][: cfg.calibration_texts]
    key = key_of(study.model_key, directions_key(dense), neutral, to_dict(cfg))
    if study.run.reuse("monitor", key, lambda: (Calibration.load(calib_path), exists_or_raise(
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


def stage_steering(study: Study, dirs_by_recipe: dict[str, EmotionDirections], sae: Any = None) -> SteeringResult | None:
    """The steering stage of `saefeatures run`: evaluations, metrics, plots, wandb.

    Replaces ``steering.*`` in metrics.json, writes ``steering/results.json`` and PNG plots under
    ``figures/steering/`` (emptied first); skipped (and reloaded) when its inputs (config, model,
    directions, SAE weights, normalising texts) did not change and its results load.

    Example:
        >>> stage_steering(study, {"dense": dense, "sae": sae_dirs}, sae)
    """
    cfg = study.cfg.steering
    results = study.run.path / "steering" / "results.json"
    figures = study.run.path / "figures" / "steering"
    if not cfg.enabled:
        if not study.world.leader:
            return None
        log.info("steering: disabled in the config")
        if "steering" in study.run.metrics:  # numbers of an earlier run must not pass for this config's
            study.run.drop("steering")
            study.run.save()
        shutil.rmtree(figures, ignore_errors=True)
        return None
    neutral = [r.text for r in study.records if r.emotion == "neutral" and r.split == "train"][:32]
    key = key_of(to_dict(cfg), model_key(study.model), neutral,
                 {k: directions_key(d) for k, d in sorted(dirs_by_recipe.items())},
                 None if sae is None else sae_fingerprint(sae), N_RESAMPLES, SEED, "texts")
    reused = reuse_together(study, "steering", key, lambda: SteeringResult.load(results))
    if reused is not None:
        log.info("steering: inputs unchanged, reusing %s", results)
        return reused
    if not study.world.leader:  # its share of the cells, handed to rank 0
        study.run.current = "steering"  # the stage its failure names
        return run_steering_evals(study.model, dirs_by_recipe, sae, cfg, neutral or None, study.world)
    with study.run.stage("steering", key):
        shutil.rmtree(figures, ignore_errors=True)  # figures of emotions no longer configured go too
        result = run_steering_evals(study.model, dirs_by_recipe, sae, cfg, neutral or None, study.world)
        study.run.replace("steering", result.metrics())
        plots = save_steering_plots(result, figures)
        result.save(results)
        tracking = study.cfg.tracking
        if tracking.wandb:
            try:
                log_steering_wandb(result, plots, tracking.project, tracking.mode, study.run.path)
            except Exception as e:  # a logging failure must not lose the evaluation
                log.warning("steering: wandb logging failed (%s: %s)", type(e).__name__, e)
    return result
