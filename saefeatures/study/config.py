"""Typed run configs: per-stage dataclasses composed in `RunConfig`, loaded strictly from YAML.

Unknown keys and wrong types are errors that name the key (``corpus.generation.top_p: expected
float, got 'high'``). Each stage's config lives in the stage's module; this file composes them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..activations import ActivationConfig
from ..corpus_build import CorpusConfig
from ..directions import DirectionConfig
from ..errors import ConfigError
from ..evals.probes import ProbeConfig
from ..evals.steering import SteeringConfig
from ..evals.suite import EvalConfig
from ..sae.assemble import SAERecipeConfig
from ..sae.config import SAEConfig
from ..sae.scoring import POOLING_FIELDS, ScoringConfig


@dataclass
class ModelConfig:
    """Which subject model, and where to read it."""

    name: str = "smollm2-135m-instruct"
    """Embedded default, a local HF checkpoint directory, or a TransformerLens model name."""
    layer: int | None = None
    """Residual layer studied (blocks.L.hook_resid_post); None: the model's default layer."""
    dtype: str = "float32"
    """Parameter dtype of the HookedTransformer (activation collection may run in bfloat16)."""
    device: str = "cpu"
    """Torch device."""


@dataclass
class CorpusSource:
    """Where the emotion-story corpus comes from."""

    path: str | None = None
    """A corpus JSONL(.gz); None: the shipped corpus of the embedded model (or build one)."""
    build: CorpusConfig = field(default_factory=CorpusConfig)
    """Used when `saefeatures corpus build` writes a new corpus."""


@dataclass
class SAEDirectionsConfig:
    """SAE-assembled directions, output scores and feature cards."""

    recipe: SAERecipeConfig = field(default_factory=SAERecipeConfig)
    main_k: int = 16
    """The k whose directions are saved as RUN/directions/sae and used for cards and steering."""
    use_output_scores: bool = True
    """Measure what each candidate latent writes (clamp effects) for rank_by='output' / output_filter."""
    output_candidates: int = 8
    """Per emotion, the top latents by AUROC whose output effect is measured."""
    clamp_scale: float = 1.0
    """Candidates are clamped to this multiple of their largest corpus activation."""
    cards_per_emotion: int = 2
    """Feature cards per emotion (its highest-weighted latents)."""
    card_snippets: int = 3
    """Top-activating snippets per card."""


@dataclass
class MonitorConfig:
    """Example traces and alarms in the run report."""

    emotions: list[str] = field(default_factory=lambda: ["afraid", "desperate", "calm"])
    """Emotions plotted in the example traces (the first one in the heat-maps)."""
    calibration_texts: int = 60
    """Neutral test texts whose token projections set the z-score baseline."""
    alarm_z: float = 3.0
    """Alarm when the rolling z-score vs neutral text exceeds this."""
    window: int = 4
    """Rolling window in tokens."""


@dataclass
class TrackingConfig:
    """wandb logging; offline unless asked."""

    wandb: bool = True
    """Log to wandb at all."""
    mode: str = "offline"
    """'offline' (sync later with `wandb sync`), 'online' or 'disabled'."""
    project: str = "saefeatures"
    """wandb project name."""


@dataclass
class RunConfig:
    """The whole study: one section per stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusSource = field(default_factory=CorpusSource)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    directions: DirectionConfig = field(default_factory=DirectionConfig)
    evals: EvalConfig = field(default_factory=EvalConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    sae_directions: SAEDirectionsConfig = field(default_factory=SAEDirectionsConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    smoke_prompt: str = "In one sentence, what is a sparse autoencoder?"
    """A chat message the model answers at the start of a run (a check that generation works)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) a YAML value against a type hint."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


MOVED = {ScoringConfig: {k: f"activations.{k}" for k in POOLING_FIELDS}}
"""Keys that moved to another section: pooling has one config (`activations`), which scoring reads too."""


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    moved = sorted(set(data) & set(MOVED.get(cls, {})))
    if moved:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{moved[0]} moved to {MOVED[cls][moved[0]]}: records are pooled one way for "
                          f"every stage. Set it there (once) and remove {', '.join(where + k for k in moved)}.")
    unknown = set(data) - names
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"Unknown config key(s){where}: {', '.join(sorted(map(str, unknown)))}. "
                          f"Known: {', '.join(sorted(names))}.")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> RunConfig:
    """Load a run config from YAML; a missing section takes its defaults, an empty file is an error
    (the code defaults differ from configs/, so running on them is rarely what was meant)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}. See configs/ for examples.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error ({problem}). Fix the file; configs/ has examples.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give a YAML run config (see configs/).") from None
    if data is None:
        raise ConfigError(f"{path} is empty. Start from a config in configs/ (e.g. configs/smollm2-135m.yaml).")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections.")
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
