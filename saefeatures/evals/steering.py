"""How `saefeatures run` evaluates steering and what `saefeatures steer` applies by default."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..neutral import NEUTRAL_PROMPTS
from ..steering.spec import SteeringSpec


@dataclass
class SteeringConfig:
    """The steering evaluations of a run and the default intervention of `saefeatures steer`."""

    enabled: bool = True
    """Run the steering evaluations in `saefeatures run`."""
    spec: SteeringSpec = field(default_factory=SteeringSpec)
    """Default intervention of `saefeatures steer` (its --emotion / --latent options override it)."""
    emotions: list[str] = field(default_factory=lambda: ["happy", "afraid", "desperate"])
    """Emotions of the dose-response curves (include a positive and a negative one)."""
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
    """Strengths, fractions of the mean residual norm at the layer; 0 is the unsteered baseline.
    On the embedded model perplexity passes 2x near 0.2, so the grid is dense below it."""
    methods: list[str] = field(default_factory=lambda: ["dense", "sae_clamp"])
    """'<recipe>' adds that recipe's direction; '<recipe>_clamp' clamps its latents ('sae_clamp')."""
    clamp_op: str = "set"
    """How emotion latents are clamped: 'set', 'add' or 'scale'."""
    clamp_latents: int = 8
    """Latents per emotion when the directions list none (nearest SAE decoder vectors)."""
    positions: str = "all"
    """Positions steered in the dose-response: 'all', 'prompt' or 'generated'."""
    prompts: list[str] = field(default_factory=lambda: list(NEUTRAL_PROMPTS))
    """Neutral chat prompts continued at every strength."""
    samples_per_prompt: int = 2
    """Continuations sampled per prompt and strength."""
    max_new_tokens: int = 40
    """Tokens generated per continuation."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy; greedy text is the model's mode, so its perplexity is an
    unfairly low reference for the fluency ratio)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty while generating (1: none)."""
    batch_size: int = 40
    """Continuations generated together."""
    ppl_limit: float = 2.0
    """Fluency breaks where perplexity exceeds this multiple of the unsteered perplexity."""
    preference: bool = True
    """Run the activity-preference evaluation."""
    preference_positive: str = "happy"
    """Positive-valence emotion steered on option A."""
    preference_negative: str = "afraid"
    """Negative-valence emotion steered on option A."""
    preference_strength: float = 0.5
    """Strength while the model reads option A (the paper used 0.5)."""
    preference_pairs: int = 6
    """Comparisons per activity (pairs are drawn at random, each shown in both orders)."""
    preference_activities: int = 0
    """Use N activities spread over the list (0: all 44); a smaller budget for quick runs."""
    pressure: bool = True
    """Run the impossible-task pressure probe."""
    seed: int = 0
    """Seed of sampling and of the activity pairs."""
