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

log = logging.getLogger(__name__)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out


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
            self.run.summary.update(flatten(metrics))

    def log_image(self, key: str, path: Path | str) -> None:
        if self.run is not None and Path(path).is_file():
            self.run.log({key: self._wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_html(self, key: str, html: str) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Html(html)})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
