"""wandb logging of a run: metrics, figures and tables; offline unless the config asks otherwise.

Offline runs land in ``RUN/wandb/`` and can be uploaded later with ``wandb sync RUN/wandb/offline-run-*``.
With ``tracking.wandb: false`` (or mode 'disabled') every call is a no-op.

Example:
    >>> with Tracker(cfg.tracking, run_dir, config=cfg_dict) as t:
    ...     t.log_metrics(metrics); t.log_image("geometry", "figures/dense/geometry.png")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..evals.dose_response import MEASURES
from ..evals.judge import judge
from ..evals.steering_suite import SteeringResult
from ..files import read_json
from ..keys import flatten
from ..report.findings import Finding, headline
from ..report.page import direction_sets

log = logging.getLogger(__name__)


class Tracker:
    """A wandb run for one study (or nothing, when tracking is off)."""

    def __init__(self, cfg, run_dir: Path | str, config: dict[str, Any] | None = None, name: str | None = None):
        self.run = None
        if not cfg.wandb or cfg.mode == "disabled":
            return
        if cfg.mode not in ("offline", "online"):
            raise ValueError(f"tracking.mode must be 'offline', 'online' or 'disabled', got '{cfg.mode}'.")
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, dir=str(run_dir), mode=cfg.mode, config=config or {},
                              name=name, reinit="finish_previous")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in flatten(metrics, "/").items() if isinstance(v, (int, float))})

    def log_image(self, key: str, path: Path | str) -> None:
        if self.run is not None and Path(path).is_file():
            self.run.log({key: self._wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], types: list[type] | None = None) -> None:
        if self.run is not None:
            self.run.log({key: typed_table(columns, rows, types)})

    def log_artifact(self, name: str, kind: str, path: Path | str, metadata: dict[str, Any] | None = None) -> None:
        """A file or directory as a wandb artifact (a new version when its content changed)."""
        if self.run is not None:
            self.run.log_artifact(file_artifact(name, kind, path, metadata))

    def log_tables(self, tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
        """Several tables, ``key -> (columns, rows)``, in one step."""
        if self.run is not None and tables:
            self.run.log({k: self._wandb.Table(columns=c, data=r) for k, (c, r) in tables.items()})

    def log_html(self, key: str, html: str) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Html(html)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def typed_table(columns: list[str], rows: list[list[Any]], types: list[type] | None = None) -> Any:
    """A wandb.Table whose columns hold ``types`` (e.g. int, float, str; None: inferred from the rows)."""
    import wandb

    return wandb.Table(columns=columns, data=rows, dtype=types)


def file_artifact(name: str, kind: str, path: Path | str, metadata: dict[str, Any] | None = None) -> Any:
    """A wandb.Artifact holding the file or directory ``path`` (its files are staged now)."""
    import wandb

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: nothing to log as the '{name}' artifact")
    art = wandb.Artifact(name, type=kind, metadata=metadata or {})
    if path.is_dir():
        art.add_dir(str(path))
    else:
        art.add_file(str(path))
    return art


def steering_panels(wandb: Any, result: SteeringResult) -> dict[str, Any]:
    """What the steering evaluations log: the curves as one table, each measure as a line plot over
    strength (one line per method, per emotion), and every continuation as a table."""
    columns = ["emotion", "method", "strength"] + [m for m, _ in MEASURES]
    curves = wandb.Table(columns=columns)
    generations = wandb.Table(columns=["emotion", "method", "strength", "prompt", "text", "projection", "valence"])
    for c in result.curves:
        for p in c.points:
            curves.add_data(c.emotion, c.method, p.strength, *[getattr(p, m) for m, _ in MEASURES])
            for i, text in enumerate(p.texts):
                generations.add_data(c.emotion, c.method, p.strength,
                                     result.prompts[i] if i < len(result.prompts) else "", text,
                                     p.projections[i] if i < len(p.projections) else None, judge([text])[0])
    panels: dict[str, Any] = {"steering/curves": curves, "steering/generations": generations}
    for emotion in dict.fromkeys(c.emotion for c in result.curves):
        mine = [c for c in result.curves if c.emotion == emotion]
        for attr, label in MEASURES:
            ys = [[getattr(p, attr) for p in c.points] for c in mine]
            if all(y is None for row in ys for y in row):
                continue
            panels[f"steering/{emotion}/{attr}"] = wandb.plot.line_series(
                xs=[[p.strength for p in c.points] for c in mine],
                ys=[[float("nan") if y is None else y for y in row] for row in ys],
                keys=[c.method for c in mine], title=f"{emotion}: {label}", xname="strength (x residual norm)")
    return panels


def log_steering_wandb(result: SteeringResult, plots: dict[str, str], project: str = "saefeatures",
                       mode: str = "offline", run_dir: Path | str | None = None) -> None:
    """Log the steering curves (line plots over strength and a table), the continuations (a table)
    and the plots to wandb (offline by default). Its scalar metrics go to the run's summary: inside
    `saefeatures run` the study logs them once at the end, so here only a run of its own gets them."""
    if mode == "disabled":
        return
    import wandb

    active = wandb.run  # inside `saefeatures run` the study's own wandb run is open: log into it
    run = active or wandb.init(project=project, mode=mode, job_type="steering", dir=str(run_dir) if run_dir else None,
                               config={"hook": result.hook, "residual_norm": result.norm})
    try:
        run.log({**steering_panels(wandb, result), **{f"steering/{k}": wandb.Image(v) for k, v in plots.items()}})
        if active is None:
            run.summary.update({f"steering/{k}": v for k, v in flatten(result.metrics(), "/").items()
                                if isinstance(v, (int, float))})
    finally:
        if active is None:
            run.finish()


def detection_tables(run_dir: Path | str) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """(columns, rows) of each direction set's per-emotion detection and confusion matrices, from
    ``figures/<set>/detection.json``, keyed ``detection/<set>/<table>``."""
    out = {}
    for path in sorted(Path(run_dir, "figures").glob("*/detection.json")):
        det, name = read_json(path), path.parent.name
        per = det.get("per_emotion", {})
        cols = ["auroc", "top1", "n", "own_mean", "neutral_mean"]
        out[f"detection/{name}/per_emotion"] = (["emotion", *cols], [[e, *(d.get(c) for c in cols)] for e, d in per.items()])
        for key in ("confusion_clusters", "confusion_display"):
            if det.get(key):
                labels, matrix = det[key]["labels"], det[key]["matrix"]
                out[f"detection/{name}/{key}"] = (["true", *labels, "records"],
                                                  [[lab, *row, sum(row)] for lab, row in zip(labels, matrix)])
    return out


def findings_table(rows: list[Finding]) -> tuple[list[str], list[list[Any]]]:
    """The report's findings box as (columns, rows)."""
    columns = ["measure", "value", "ci_lower", "ci_upper", "null", "null_mean", "null_p95", "null_percentile", "paper"]
    return columns, [[f.measure, f.value, *(f.ci[k] if f.ci else None for k in ("lower", "upper")), f.null_kind,
                      *(f.null[k] if f.null else None for k in ("mean", "p95", "percentile")), f.paper] for f in rows]


def report_tables(run_dir: Path | str, metrics: dict[str, Any], manifest: dict[str, Any]) -> dict[str, tuple]:
    """The tables a finished run logs: the findings box and every detection table."""
    return {"findings": findings_table(headline(metrics, direction_sets(metrics, manifest))),
            **detection_tables(run_dir)}
