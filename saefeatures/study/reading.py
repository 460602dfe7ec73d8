"""Read-only use of a finished run (`saefeatures read`, `saefeatures monitor`): its direction sets
reading new texts, calibrated against neutral text, and its monitor tracing a chat.

Nothing in the run directory is written: the run opens read-only, and what a run saved before
directions recorded their pooling or a neutral sample is filled in memory from the run's config
(its ``activations`` section pooled every direction set) and its corpus (the neutral texts of the
evaluation split).

Example:
    >>> run = FinishedRun.open("runs/smollm2-135m")
    >>> sets = run.direction_sets()
    >>> model = run.load_model()
    >>> read_texts(model, sets, ["The invoice is attached."], neutral_texts=run.neutral_texts())[0]["dense"]["top"]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..corpus import load_corpus
from ..directions import EmotionDirections, pooling_record
from ..errors import ConfigError, UserError
from ..models import load_model
from ..monitor import Calibration, calibrate
from .config import RunConfig, from_dict
from .preflight import corpus_path
from .rundir import RunDir

SETS = ("dense", "sae")
"""The direction sets a run keeps under ``directions/``: dense, and SAE-assembled at the main k."""


@dataclass
class FinishedRun:
    """A finished run directory, opened for reading only."""

    path: Path
    cfg: RunConfig
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str) -> "FinishedRun":
        run = RunDir.open(path, readonly=True)
        try:
            cfg = from_dict(RunConfig, run.manifest.get("config") or {})
        except ConfigError as e:
            raise UserError(f"{run.path / 'manifest.json'}: the run's config does not load in this version ({e}); "
                            "read its directions with --directions DIR instead.") from None
        return cls(run.path, cfg, run.manifest)

    def direction_sets(self) -> dict[str, EmotionDirections]:
        """The run's dense directions and, when present, its SAE-assembled ones (pooling filled in)."""
        dense = self.path / "directions" / "dense"
        if not (dense / "directions.json").is_file():
            raise UserError(f"{self.path} has no directions/dense: the run stopped before its directions; "
                            "rerun `saefeatures run` with the same --out to finish it.")
        sets = {name: EmotionDirections.load(self.path / "directions" / name) for name in SETS
                if (self.path / "directions" / name / "directions.json").is_file()}
        return {name: self.with_pooling(d) for name, d in sets.items()}

    def with_pooling(self, dirs: EmotionDirections) -> EmotionDirections:
        """``dirs`` with the run's pooling recorded, if they were saved without it."""
        if "pooling" in dirs.metadata:
            return dirs
        return replace(dirs, metadata={**dirs.metadata,
                                       "pooling": pooling_record(self.cfg.activations, dirs.hook, dirs.layer)})

    @property
    def corpus_file(self) -> Path:
        return Path((self.manifest.get("corpus") or {}).get("path") or corpus_path(self.cfg))

    def neutral_texts(self) -> list[str]:
        """The neutral texts of the run's evaluation split (what its monitor and `read` calibrate on)."""
        path = self.corpus_file
        if not path.is_file():
            raise UserError(f"The run's corpus {path} is gone, and its directions carry no neutral sample to "
                            "calibrate against: restore the corpus, or read raw projections (--raw).")
        split = self.cfg.evals.split
        return [r.text for r in load_corpus(path) if r.emotion == "neutral" and r.split == split]

    def needs_neutral(self, sets: dict[str, EmotionDirections]) -> bool:
        return any(d.neutral is None for d in sets.values())

    def monitor_calibration(self, model, dense: EmotionDirections) -> Calibration:
        """The token-level calibration the run's monitor saved, else one computed now (not saved)."""
        path = self.path / "directions" / "dense" / "calibration.json"
        if path.is_file():
            return Calibration.load(path)
        return calibrate(model, dense, self.neutral_texts()[: self.cfg.monitor.calibration_texts])

    def load_model(self):
        m = self.cfg.model
        return load_model(m.name, dtype=m.dtype, device=m.device)


def read_texts(model, sets: dict[str, EmotionDirections], texts: list[str], top: int = 3,
               raw: bool = False, neutral_texts: list[str] | None = None) -> list[dict[str, Any]]:
    """Per text, per direction set: its ``top`` emotions and every score (z vs neutral, or raw;
    with ``neutral_texts``, z vs them cut to the text's length: `EmotionDirections.read`)."""
    out: list[dict[str, Any]] = [{"text": t} for t in texts]
    memo: dict = {}  # sets pooled alike (dense and SAE at one hook) pool each text once
    for name, dirs in sets.items():
        for row, scores in zip(out, dirs.read(model, texts, raw=raw, neutral_texts=neutral_texts, memo=memo)):
            ranked = sorted(scores.items(), key=lambda kv: -kv[1])
            row[name] = {"top": [[n, round(v, 3)] for n, v in ranked[:top]],
                         "scores": {n: round(v, 4) for n, v in scores.items()}}
    return out


def format_readings(rows: list[dict[str, Any]], sets: list[str], unit: str) -> str:
    """The human-readable form of `read_texts`: each text, then one line of top emotions per set."""
    lines = []
    for row in rows:
        lines.append(repr(row["text"]))
        for name in sets:
            lines.append(f"  {name:<6} " + ", ".join(f"{n} {v:+.2f}" for n, v in row[name]["top"]) + f"  ({unit})")
    return "\n".join(lines)
