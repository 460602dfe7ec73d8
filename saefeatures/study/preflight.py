"""Checks of a whole run config, and of the corpus and SAE it names, before the model loads.

Every subcommand calls these first, so a bad value, label or file fails in a second with one
line naming the key or file and the fix, instead of after minutes of forward passes. Only what
can be read cheaply is read: the config itself, the corpus file (strictly, line by line), the
SAE's cfg.json and its weights' safetensors header, a local checkpoint's config.json. What only
the loaded model can tell (the depth of a hub model) is checked again once it has loaded.

Example:
    >>> cfg = load_config("configs/smollm2-135m.yaml")
    >>> check_run(cfg)            # raises UserError (ConfigError, CorruptCorpusError, SAELoadError...)
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformer_lens.loading_from_pretrained import get_official_model_name

from .. import emotions as emo
from ..corpus import DEFAULT_CORPUS, KINDS, NON_EMOTION, CorpusRecord, check_labels, check_splits, load_corpus
from ..directions import EmotionDirections
from ..errors import ConfigError, UserError
from ..evals.dose_response import check_strengths
from ..hook_names import hook_name
from ..model_cache import EMBEDDED_NAME, ModelLoadError, embedded_model_file
from ..models import known_shape, resolve_layer
from ..prompts import SPLITS
from ..sae.assemble import RANKS, SELECTS, WEIGHTINGS
from ..sae.config import ARCHITECTURES, SOURCES
from ..sae.load import check_sae_files, shipped_sae_dir
from ..steering import OPS, POSITIONS, SteeringError, SteeringSpec
from .config import RunConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
TRACKING_MODES = ("offline", "online", "disabled")
RECIPES = ("dense", "sae")
MIN_EMOTIONS = 3
"""Rated emotions the train split needs: the geometry evaluation fits valence and arousal to them."""


def corpus_path(cfg: RunConfig) -> Path:
    """The corpus a run reads: ``corpus.path``, else the shipped corpus."""
    return Path(cfg.corpus.path) if cfg.corpus.path else DEFAULT_CORPUS


def model_shape(cfg: RunConfig, model: Any = None) -> tuple[int, int] | None:
    """(n_layers, d_model) of the run's model: from the loaded model, else without loading it."""
    if model is not None:
        return model.cfg.n_layers, model.cfg.d_model
    return known_shape(cfg.model.name)


def run_layer(cfg: RunConfig, model: Any = None) -> int | None:
    """The studied layer: model.layer, else the model's default; None if only loading would tell."""
    shape = model_shape(cfg, model) if cfg.model.layer is None else None
    try:
        return resolve_layer(cfg.model.layer, cfg.model.name, shape[0] if shape else None)
    except ModelLoadError:
        return None


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}.")


def _at_least(key: str, value: float | None, minimum: float) -> None:
    if value is not None and not (math.isfinite(value) and value >= minimum):
        raise ConfigError(f"{key}: must be a number >= {minimum:g}, got {value!r}.")


def _emotions(key: str, names: list[str]) -> None:
    for name in names:
        try:
            emo.get(name)
        except emo.UnknownEmotionError as e:
            raise ConfigError(f"{key}: {e}") from None


def _device(key: str, device: str | None) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key}: '{device}' is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{device}' asked for, but torch sees no CUDA device here; set {key}: cpu.")


def check_model(cfg: RunConfig, model: Any = None) -> None:
    """The model's name, device, dtype and layers; layer ranges once its depth is known."""
    m = cfg.model
    _device("model.device", m.device)
    _device("sae.device", cfg.sae.device)
    _one_of("model.dtype", m.dtype, DTYPES)
    if model is None:
        if m.name == EMBEDDED_NAME:
            embedded_model_file()
        elif Path(m.name).exists():
            _check_checkpoint(Path(m.name))
        else:
            try:
                get_official_model_name(m.name)
            except ValueError:
                raise ConfigError(f"model.name: '{m.name}' is neither '{EMBEDDED_NAME}', an existing directory, "
                                  "nor a TransformerLens official model name. Check the spelling, or give a "
                                  "path.") from None
    shape = model_shape(cfg, model)
    if shape is None:
        return
    n_layers = shape[0]
    layers = {"model.layer": [run_layer(cfg, model)], "activations.layers": cfg.activations.layers}
    for key, values in layers.items():
        out = [v for v in values if v is not None and not 0 <= v < n_layers]
        if out:
            raise ConfigError(f"{key}: layer {out[0]} is out of range for {m.name} ({n_layers} layers): "
                              f"use 0..{n_layers - 1}.")


def _check_checkpoint(root: Path) -> None:
    """A local HF checkpoint: config.json readable, every safetensors file whole."""
    from safetensors import SafetensorError, safe_open

    if not (root / "config.json").is_file():
        raise ModelLoadError(f"model.name: {root} is not a HuggingFace checkpoint directory (no config.json). "
                             "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir).")
    known_shape(str(root))  # a config.json that is not JSON fails here
    for path in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: unreadable or truncated safetensors file ({e}). "
                                 "Copy or save the checkpoint again.") from None


def check_values(cfg: RunConfig) -> None:
    """Every enumerated, numeric and emotion-name setting of the config, on its own."""
    _one_of("activations.dtype", cfg.activations.dtype, DTYPES)
    _one_of("corpus.build.generation.dtype", cfg.corpus.build.generation.dtype, DTYPES)
    _one_of("sae.dtype", cfg.sae.dtype, DTYPES[1:])
    _one_of("sae.source", cfg.sae.source, SOURCES)
    _one_of("sae.train.architecture", cfg.sae.train.architecture, ARCHITECTURES)
    _one_of("tracking.mode", cfg.tracking.mode, TRACKING_MODES)
    for key, split in (("scoring.split", cfg.scoring.split), ("evals.split", cfg.evals.split),
                       ("sae.eval.split", cfg.sae.eval.split)):
        _one_of(key, split, SPLITS)
    for split in cfg.sae.train.splits:
        _one_of("sae.train.splits", split, SPLITS)
    for kind in cfg.sae.train.kinds:
        _one_of("sae.train.kinds", kind, KINDS)
    recipe = cfg.sae_directions.recipe
    _one_of("sae_directions.recipe.rank_by", recipe.rank_by, RANKS)
    _one_of("sae_directions.recipe.select", recipe.select, SELECTS)
    _one_of("sae_directions.recipe.weighting", recipe.weighting, WEIGHTINGS)
    if not recipe.ks or min(recipe.ks) < 1:
        raise ConfigError(f"sae_directions.recipe.ks: give one or more k >= 1, got {recipe.ks}.")
    for key, value, minimum in (
        ("activations.batch_tokens", cfg.activations.batch_tokens, 1),
        ("activations.max_tokens", cfg.activations.max_tokens, 2),
        ("activations.skip_first", cfg.activations.skip_first, 0),
        ("activations.shard_records", cfg.activations.shard_records, 1),
        ("scoring.hist_bins", cfg.scoring.hist_bins, 1),
        ("scoring.warmup_records", cfg.scoring.warmup_records, 1),
        ("evals.emobank_limit", cfg.evals.emobank_limit, 1),
        ("sae.eval.max_tokens", cfg.sae.eval.max_tokens, 1),
        ("sae.eval.ce_tokens", cfg.sae.eval.ce_tokens, 1),
        ("sae.eval.batch_size", cfg.sae.eval.batch_size, 1),
        ("sae_directions.main_k", cfg.sae_directions.main_k, 1),
        ("sae_directions.recipe.candidates", recipe.candidates, 1),
        ("sae_directions.output_candidates", cfg.sae_directions.output_candidates, 1),
        ("monitor.calibration_texts", cfg.monitor.calibration_texts, 1),
        ("monitor.window", cfg.monitor.window, 1),
        ("corpus.build.generation.temperature", cfg.corpus.build.generation.temperature, 0),
        ("corpus.build.generation.batch_size", cfg.corpus.build.generation.batch_size, 1),
        ("corpus.build.generation.max_new_tokens", cfg.corpus.build.generation.max_new_tokens, 1),
        ("corpus.build.steer", cfg.corpus.build.steer, 0),
    ):
        _at_least(key, value, minimum)
    if cfg.evals.emobank_path and not Path(cfg.evals.emobank_path).is_file():
        raise ConfigError(f"evals.emobank_path: no file at {cfg.evals.emobank_path}; give emobank.csv or null "
                          "(the shipped copy).")
    emotions = cfg.corpus.build.emotions
    _emotions("corpus.build.emotions", [] if emotions == ["all"] else emotions)
    _emotions("monitor.emotions", cfg.monitor.emotions)
    if not cfg.monitor.emotions:
        raise ConfigError("monitor.emotions: give at least one emotion to trace (e.g. [afraid, calm]).")
    _emotions("probes.emotions", cfg.probes.emotions)
    if cfg.sae.source == "pretrained" and not (cfg.sae.release and cfg.sae.sae_id):
        raise ConfigError("sae.source is 'pretrained' but sae.release or sae.sae_id is missing; set both "
                          "(see SAELens' pretrained_saes.yaml).")
    check_steering(cfg)


def check_steering(cfg: RunConfig) -> None:
    """The steering section: the intervention spec and, when enabled, the evaluations."""
    s = cfg.steering
    spec = s.spec
    for key, value, allowed in (("method", spec.method, ("direction", "clamp")), ("op", spec.op, OPS),
                                ("positions", spec.positions, POSITIONS)):
        _one_of(f"steering.spec.{key}", value, allowed)
    _emotions("steering.spec.emotions", list(spec.emotions))
    bad = [f"{k}={v}" for k, v in {**spec.emotions, **spec.latents}.items() if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"steering.spec: values must be finite numbers, got {', '.join(map(str, bad))}.")
    if not s.enabled:
        return
    try:
        check_strengths(s.strengths)
    except SteeringError as e:
        raise ConfigError(str(e)) from None
    _emotions("steering.emotions", s.emotions)
    if s.preference:
        _emotions("steering.preference_positive", [s.preference_positive])
        _emotions("steering.preference_negative", [s.preference_negative])
    for method in s.methods:
        recipe = method.removesuffix("_clamp")
        if recipe not in RECIPES:
            raise ConfigError(f"steering.methods: '{method}' is not one of {', '.join(RECIPES)}, "
                              f"{', '.join(r + '_clamp' for r in RECIPES)}.")
    _one_of("steering.clamp_op", s.clamp_op, OPS)
    _one_of("steering.positions", s.positions, POSITIONS)
    if not s.prompts:
        raise ConfigError("steering.prompts: give at least one chat prompt to continue.")
    for key, value, minimum in (("steering.samples_per_prompt", s.samples_per_prompt, 1),
                                ("steering.max_new_tokens", s.max_new_tokens, 1),
                                ("steering.batch_size", s.batch_size, 1),
                                ("steering.temperature", s.temperature, 0),
                                ("steering.top_p", s.top_p, 1e-9),
                                ("steering.ppl_limit", s.ppl_limit, 1),
                                ("steering.clamp_latents", s.clamp_latents, 1)):
        _at_least(key, value, minimum)
    if s.top_p > 1:
        raise ConfigError(f"steering.top_p: must be in (0, 1], got {s.top_p}.")


def check_corpus(cfg: RunConfig, kinds: tuple[str, ...] = ("story", "dialogue", "neutral")) -> list[CorpusRecord]:
    """Read the run's corpus strictly and check it has what the stages need; returns its kept records.

    Needs: known labels, topic-disjoint splits, at least `MIN_EMOTIONS` rated emotions in the train
    split, every emotion of the evaluation split also in train, neutral texts in the test split (the
    monitor's calibration), records in the scored and SAE-evaluation splits.
    """
    path = corpus_path(cfg)
    records = load_corpus(path, kinds=kinds)
    if not records:
        raise ConfigError(f"{path} holds no kept records of kinds {', '.join(kinds)}. Build a corpus with "
                          "`saefeatures corpus build`, or set corpus.path to one.")
    check_labels(records, path)
    check_splits(records)
    by_split: dict[str, set[str]] = {split: set() for split in SPLITS}
    for r in records:
        by_split[r.split].add(r.emotion)
    train = by_split["train"] - set(NON_EMOTION)
    rated = [e for e in train if emo.get(e).valence is not None]
    if len(rated) < MIN_EMOTIONS:
        raise ConfigError(f"{path}: the train split has {len(rated)} emotion(s) with valence ratings "
                          f"({', '.join(sorted(rated)) or 'none'}); the directions and their geometry need at "
                          f"least {MIN_EMOTIONS}. Build the corpus with more emotions (corpus.build.emotions).")
    split = cfg.evals.split
    held_out = by_split[split] - set(NON_EMOTION)
    if not held_out:
        raise ConfigError(f"{path}: no emotion records in split '{split}' (evals.split): its topics all fall in "
                          "other splits. Build the corpus with more topics (corpus.build.topics >= 10).")
    if held_out - train:
        raise ConfigError(f"{path}: emotions {sorted(held_out - train)[:5]} are in split '{split}' but not in "
                          "train, so they get no direction. Build the corpus with more stories per emotion.")
    if "neutral" not in by_split["test"]:
        raise ConfigError(f"{path}: no neutral texts in the test split; the monitor calibrates its alarms on "
                          "them. Build the corpus with neutral_per_topic >= 1.")
    for key, split in (("scoring.split", cfg.scoring.split), ("sae.eval.split", cfg.sae.eval.split)):
        if not by_split[split]:
            raise ConfigError(f"{key}: the corpus {path} has no records in split '{split}'.")
    return records


def check_named_emotions(cfg: RunConfig, records: list[CorpusRecord]) -> None:
    """Every emotion the monitor and steering sections name has train records (hence a direction)."""
    path = corpus_path(cfg)
    train = {r.emotion for r in records if r.split == "train"}
    named = {"monitor.emotions": cfg.monitor.emotions}
    if cfg.steering.enabled:
        named["steering.emotions"] = cfg.steering.emotions
        if cfg.steering.preference:
            named["steering.preference_positive/negative"] = [cfg.steering.preference_positive,
                                                              cfg.steering.preference_negative]
    for key, names in named.items():
        absent = [n for n in names if n not in train]
        if absent:
            raise ConfigError(f"{key}: {', '.join(absent)} not in the corpus's train split ({path}), so no "
                              "direction is built for it. Pick emotions the corpus has, or rebuild it with them.")


def check_training_corpus(cfg: RunConfig) -> None:
    """The records `saefeatures sae train` trains on: kinds and splits present in the corpus."""
    t = cfg.sae.train
    path = corpus_path(cfg)
    records = [r for r in load_corpus(path, kinds=t.kinds) if r.split in t.splits]
    if not records:
        raise ConfigError(f"{path}: no kept records of kinds {t.kinds} in splits {t.splits} "
                          "(sae.train.kinds, sae.train.splits). Pick kinds and splits the corpus has.")
    check_labels(records, path)


def check_sae_config(cfg: RunConfig, model: Any = None) -> None:
    """The SAE the run loads: a local (or shipped) directory's files against the layer and width."""
    if cfg.sae.source != "local":
        return
    layer = run_layer(cfg, model)
    if cfg.sae.path is None and layer is None:
        return
    path = Path(cfg.sae.path) if cfg.sae.path else shipped_sae_dir(cfg.model.name, layer)
    shape = model_shape(cfg, model)
    hook = cfg.sae.hook or (hook_name(layer) if layer is not None else None)
    check_sae_files(path, hook=hook, d_model=shape[1] if shape else None)


def check_steer(cfg: RunConfig, spec: SteeringSpec, dirs: EmotionDirections | None, dirs_path: str | None,
                sae_path: str | None) -> tuple[int | None, bool]:
    """`saefeatures steer`: the model, the spec, the directions its emotions need, and the SAE that
    latents or clamping need. Returns (layer steered, whether an SAE is needed)."""
    check_model(cfg)
    spec.validate()
    shape = model_shape(cfg)
    if spec.emotions and dirs is None:
        raise UserError("--emotion needs --directions DIR (e.g. RUN/directions/dense): each emotion's direction "
                        "(or, with --method clamp, its SAE latents) comes from there.")
    if dirs is not None:
        absent = [n for n in spec.emotions if n not in dirs.names]
        if absent:
            raise UserError(f"{', '.join(absent)} not in the directions at {dirs_path} ({len(dirs.names)} "
                            "emotions). Steer emotions they hold, or build directions with them.")
        if shape is not None and dirs.d_model != shape[1]:
            raise UserError(f"The directions at {dirs_path} have width {dirs.d_model}, but {cfg.model.name} has "
                            f"d_model {shape[1]}: they were built on another model.")
    layer = dirs.layer if dirs is not None else run_layer(cfg)
    needs_sae = bool(sae_path or spec.latents or spec.method == "clamp")
    if not needs_sae:
        return layer, False
    what = "--latent" if spec.latents else "--method clamp" if spec.method == "clamp" else "--sae"
    if sae_path:
        check_sae_files(sae_path, hook=spec.hook or (hook_name(layer) if layer is not None else None),
                        d_model=shape[1] if shape else None)
    elif cfg.sae.source == "train" or (cfg.sae.source == "local" and cfg.sae.path is None and layer is None):
        raise UserError(f"{what} needs an SAE: give --sae DIR, or a config whose sae.path or model.layer "
                        "names one (the shipped SAE is at layer 18).")
    else:
        try:
            check_sae_config(replace(cfg, model=replace(cfg.model, layer=layer)))
        except UserError as e:
            raise UserError(f"{what} needs an SAE, and the config's is not usable: {e} Or give --sae DIR.") from None
    return layer, True


def check_run(cfg: RunConfig, model: Any = None) -> None:
    """Everything `saefeatures run` reads, before any slow work: config values, model name and
    layers, the corpus, the SAE. ``model``: the loaded model, when there is one already."""
    check_values(cfg)
    check_model(cfg, model)
    check_named_emotions(cfg, check_corpus(cfg))
    if cfg.sae.source == "train":
        check_training_corpus(cfg)
    check_sae_config(cfg, model)
