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
from ..evals.steering_suite import SteeringResult
from ..keys import flatten

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


def log_steering_wandb(result: SteeringResult, plots: dict[str, str], project: str = "saefeatures",
                       mode: str = "offline", run_dir: Path | str | None = None) -> None:
    """Log the steering metrics, curves (as a table) and plots to wandb (offline by default)."""
    if mode == "disabled":
        return
    import wandb

    active = wandb.run  # inside `saefeatures run` the study's own wandb run is open: log into it
    run = active or wandb.init(project=project, mode=mode, job_type="steering", dir=str(run_dir) if run_dir else None,
                               config={"hook": result.hook, "residual_norm": result.norm})
    try:
        flat = {f"steering/{k}": v for k, v in flatten(result.metrics(), "/").items() if isinstance(v, (int, float))}
        columns = ["emotion", "method", "strength"] + [m for m, _ in MEASURES]
        table = wandb.Table(columns=columns)
        for c in result.curves:
            for p in c.points:
                table.add_data(c.emotion, c.method, p.strength, *[getattr(p, m) for m, _ in MEASURES])
        run.log({**flat, "steering/curves": table,
                 **{f"steering/{k}": wandb.Image(v) for k, v in plots.items()}})
    finally:
        if active is None:
            run.finish()
