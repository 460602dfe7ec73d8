"""Causal checks of emotion steering on the subject model: dose-response curves
(`evals.dose_response`), activity preference (`evals.preference`) and the impossible-task
pressure probe (`evals.pressure`), configured by one `SteeringConfig` and gathered in one
`SteeringResult` whose `metrics` are the ``steering`` section of metrics.json
(``steering.<emotion>.judge_valence_spearman``, ``steering.<emotion>.max_strength_ppl_ratio_under_2``,
``steering.preference_shift``).

Example:
    >>> result = run_steering_evals(model, {"dense": dense}, sae, SteeringConfig())
    >>> result.metrics()["happy"]["judge_valence_spearman"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..directions import EmotionDirections
from ..distributed import World
from ..files import read_json, write_json
from ..steering import SteeringError, residual_norm
from .activities import ACTIVITIES
from .dose_response import Curve, dose_response
from .preference import PreferenceResult, preference_eval, spread
from .pressure import PressureResult, pressure_probe
from .steering import SteeringConfig

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@dataclass
class SteeringResult:
    """Everything the steering evaluations measured (JSON round-trip with to_dict / from_dict)."""

    curves: list[Curve]
    preference: PreferenceResult | None
    pressure: PressureResult | None
    norm: float
    hook: str
    ppl_limit: float = 2.0
    primary: str = "dense"
    """The method whose numbers go to steering.<emotion>.* (the others under steering.<emotion>.<method>.*)."""
    prompts: list[str] = field(default_factory=list)
    """The prompt of each continuation at a strength (`CurvePoint.texts` follow this order)."""

    def metrics(self) -> dict[str, Any]:
        """The ``steering`` section of metrics.json."""
        out: dict[str, Any] = {"residual_norm": self.norm}
        for c in self.curves:
            m = c.metrics(self.ppl_limit)
            entry = out.setdefault(c.emotion, {})
            entry[c.method] = m
            if c.method == self.primary:
                entry.update(m)
        if self.preference is not None:
            out.update(self.preference.metrics())
        if self.pressure is not None:
            out["pressure"] = self.pressure.metrics()
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SteeringResult":
        curves = [Curve.from_dict(c) for c in d["curves"]]
        pref = PreferenceResult(**d["preference"]) if d.get("preference") else None
        pres = PressureResult(**d["pressure"]) if d.get("pressure") else None
        return cls(curves, pref, pres, d["norm"], d["hook"], d.get("ppl_limit", 2.0), d.get("primary", "dense"),
                   d.get("prompts", []))

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path | str) -> "SteeringResult":
        return cls.from_dict(read_json(path))


def run_steering_evals(
    model: HookedTransformer,
    dirs_by_recipe: dict[str, EmotionDirections],
    sae: Any,
    cfg: SteeringConfig,
    norm_texts: Sequence[str] | None = None,
    world: World = World(),
) -> SteeringResult:
    """Dose-response curves, the preference evaluation and the pressure probe. Under `torchrun`
    (``world``) the dose-response cells are spread over the ranks; rank 0 alone runs the preference
    evaluation and the pressure probe, and the other ranks get the curves only.

    The dense directions (else the first recipe given) read the continuations and steer the
    preference evaluation; every method in ``cfg.methods`` gets its own curves.

    Example:
        >>> result = run_steering_evals(model, {"dense": dense, "sae": sae_dirs}, sae, SteeringConfig())
    """
    if not dirs_by_recipe:
        raise SteeringError("run_steering_evals needs at least one set of directions (e.g. {'dense': dirs}).")
    reader = dirs_by_recipe.get("dense") or next(iter(dirs_by_recipe.values()))
    norm = residual_norm(model, reader.hook, norm_texts)
    t0 = time.perf_counter()
    curves = dose_response(model, dirs_by_recipe, sae, cfg, reader, norm, world)
    log.info("steering: dose-response done in %.0f s", time.perf_counter() - t0)
    primary = cfg.methods[0] if cfg.methods else "dense"
    if not world.leader:
        return SteeringResult(curves, None, None, norm, reader.hook, cfg.ppl_limit, primary)
    pref = None
    if cfg.preference:
        missing = [e for e in (cfg.preference_positive, cfg.preference_negative) if e not in reader.names]
        if missing:
            log.warning("steering: preference skipped, %s not in the directions", missing)
        else:
            pref = preference_eval(model, reader, reader, cfg, norm, activities=spread(ACTIVITIES, cfg.preference_activities))
            log.info("steering: preference done (%.0f s in all)", time.perf_counter() - t0)
    pres = None
    if cfg.pressure:
        if any(e in reader.names for e in ("desperate", "calm")):
            pres = pressure_probe(model, reader)
        else:
            log.warning("steering: pressure probe skipped, no 'desperate' or 'calm' direction")
    return SteeringResult(curves, pref, pres, norm, reader.hook, cfg.ppl_limit, primary,
                          [p for p in cfg.prompts for _ in range(cfg.samples_per_prompt)])
