"""Steer a model by clamping emotion latents of an SAE or adding emotion directions.

`SteeringSpec` says what (YAML / CLI), `Steering.from_spec` resolves it to tensors at one hook,
`Steering.applied` / `steered` attach it inside a ``with`` (TransformerLens or the fast HF twin),
and `generate_steered` writes steered continuations. Either intervention applies at all
positions, prompt positions only, or generated positions only, also while generating with a KV
cache.

Example:
    >>> steering = Steering.from_spec(SteeringSpec(emotions={"happy": 0.3}), model, directions=dirs)
    >>> with steering.applied(model):
    ...     model.generate("Tell me about your day.", max_new_tokens=20)
    >>> generate_steered(model, steering, ["Tell me about your day."], max_new_tokens=40)   # HF path
"""

from .attach import SteeringHandle, check_hook, steered
from .generate import Generation, generate_steered, generate_steered_full, left_pad, render_prompts, steer_prompts
from .intervention import Steering, emotion_latent_values, emotion_latents, residual_norm
from .spec import BACKENDS, METHODS, OPS, POSITIONS, SteeringError, SteeringSpec, parse_assignments

__all__ = ["BACKENDS", "METHODS", "OPS", "POSITIONS", "Generation", "Steering", "SteeringError", "SteeringHandle",
           "SteeringSpec", "check_hook", "emotion_latent_values", "emotion_latents", "generate_steered",
           "generate_steered_full", "left_pad", "parse_assignments", "render_prompts", "residual_norm",
           "steer_prompts", "steered"]
