"""Steering the writer: the model writes an emotion's corpus texts with that emotion's direction
added to its residual stream (issue 14).

The embedded 135M model's own stories carry their emotion weakly. Written while steered along
the emotion's dense direction from a run on an earlier corpus (`CorpusConfig.steer`), they carry
it more: the model, reading them, recognises the intended emotion more often, and directions
averaged over them (read unsteered, as every corpus is read) read a strong writer's stories
better, 8 stories per emotion at a time (``scripts/bench_recipes.py --steer``). A whole corpus so
built did not: its own held-out numbers jumped (the texts carry the direction's imprint) while the
reader test stayed put and the geometry weakened (README, corpus section). The strength is in
units of the mean residual norm at the directions' hook, as `saefeatures.steering` measures
strengths.

Example:
    >>> vectors = writer_vectors(hf, tokenizer, EmotionDirections.load("runs/x/directions/dense"), 0.1)
    >>> with writing_steered(hf, vectors["afraid"], "blocks.18.hook_resid_post"):
    ...     texts = generator.generate(prompts, seed=0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from .directions import EmotionDirections
from .hf_hooks import run_to_hooks, tl_named_hooks
from .neutral import NEUTRAL_TEXTS
from .steering.intervention import mean_token_norm


def hf_residual_norm(hf: Any, tokenizer: Any, hook: str, texts: Sequence[str] = NEUTRAL_TEXTS,
                     max_tokens: int = 128) -> float:
    """Mean L2 norm of the residual stream at ``hook`` (a TransformerLens name) of a HuggingFace
    model over ``texts``, first token left out: `steering.intervention.residual_norm` without a
    HookedTransformer (a corpus build loads only the HF model)."""
    norm = mean_token_norm(lambda tokens: run_to_hooks(hf, tokens, [hook])[hook], tokenizer, texts, max_tokens)
    return norm or 0.0


def writer_vectors(hf: Any, tokenizer: Any, directions: EmotionDirections, strength: float) -> dict[str, Tensor]:
    """Per emotion of ``directions``: ``strength`` x the mean residual norm at their hook x its unit
    direction, the vector added while the model writes that emotion's texts."""
    scale = strength * hf_residual_norm(hf, tokenizer, directions.hook)
    return {name: scale * directions.vector(name).float() for name in directions.names}


@contextlib.contextmanager
def writing_steered(hf: Any, vector: Tensor, hook: str) -> Iterator[None]:
    """Inside the ``with``: ``vector`` added at ``hook`` at every position, (d_model,) to every
    sequence of a batch or (batch, d_model) one row per sequence."""
    shaped = vector if vector.dim() == 1 else vector[:, None, :]

    def add(act: Tensor, positions: Tensor) -> Tensor:  # noqa: ARG001
        return act + shaped.to(act.device, act.dtype)

    with tl_named_hooks(hf, [(hook, add)]):
        yield
