"""saefeatures: sparse-autoencoder features behind emotion concepts in language models.

The public names load lazily, so ``import saefeatures`` stays fast:

    >>> from saefeatures import load_model, EmotionDirections, Steering, SteeringSpec, generate_steered
    >>> model = load_model("smollm2-135m-instruct")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "model_identity": "models", "hf_twin": "models",
    "EMOTIONS": "emotions",
    "load_corpus": "corpus",
    "ActivationConfig": "activations", "collect_pooled": "activations",
    "EmotionDirections": "directions", "build_dense": "directions", "build_sae": "directions",
    "load_sae": "saes", "spliced": "saes",
    "score_latents": "scoring", "LatentScores": "scoring",
    "Steering": "steering", "SteeringSpec": "steering", "steered": "steering", "generate_steered": "steering",
    "trace_text": "monitor", "trace_chat": "monitor", "calibrate": "monitor", "alarms": "monitor",
    "LiveMonitor": "monitor",
    "load_config": "config", "RunConfig": "config",
    "run_study": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'saefeatures' has no attribute '{name}'")
