"""Concept sentences: short sentences that name an emotion, an anchor for its dense direction.

The embedded 135M model's own stories carry their emotion only weakly (issue 14): dense directions
averaged over them read a strong writer's stories at AUROC ~0.66-0.70, however the stories are
asked for, filtered or read. The model reading one-line sentences that name the emotion ("I was
so afraid that my hands were shaking.") puts its concept of the emotion in play, and directions
from those sentences err differently from the story directions; the dense recipe adds the two
(`directions.DirectionConfig.concept_weight`). The sentences are filled in from this module's
templates, not written by the model, and are only ever read to build directions: detection and the
reader test read stories. ``scripts/bench_direction_recipe.py --concept-weights`` measures the mix.

Example:
    >>> sentences = concept_sentences(["afraid", "calm"])
    >>> sentences[0].text
    'I feel so afraid.'
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

TEMPLATES: tuple[str, ...] = (
    "I feel so {e}.", "She was {e} all day.", "He felt {e} when he heard the news.", "We were all {e}.",
    "I have never been this {e}.", "They looked {e}.", "Being {e} is exhausting.", "You seem {e} today.",
    "The man was {e} and could not hide it.", "Today I am {e}.",
    "My sister sounded {e} on the phone last night.", "The old woman sat on the porch, feeling {e}.",
    "When the letter arrived, he was suddenly {e}.", "I woke up {e} and stayed that way until dinner.",
    "The whole team felt {e} after the meeting.", "Honestly, I'm feeling pretty {e} right now.",
    "The boy grew more and more {e} as the night went on.", "Why do I always end up feeling {e}?",
    "She tried to explain how {e} she was.", "It is strange to feel {e} on a Monday morning.",
    "Everyone in the room could tell that Dad was {e}.", "I was so {e} that my hands were shaking.",
    "After the call, Nora felt deeply {e}.", "Walking home, Sam felt {e} and a little tired.",
    "The teacher looked {e} when she read the results.", "He admitted he had been {e} for weeks.",
    "Feeling {e}, she closed the door behind her.", "The kids were {e} about the trip.",
    "I could not stop feeling {e}.", "My friend told me she was {e}.",
)
"""Everyday frames, first and third person, each with one slot for the emotion word."""


class ConceptSentence(NamedTuple):
    """One filled-in template, as `activations.collect_pooled` takes records."""

    id: str
    emotion: str
    text: str


def concept_sentences(emotions: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[ConceptSentence]:
    """Every template filled in with every emotion word (emotion-major order)."""
    return [ConceptSentence(f"concept-{e.replace(' ', '_')}-{i:02d}", e, t.format(e=e))
            for e in emotions for i, t in enumerate(templates)]


def templates_key(templates: Sequence[str] = TEMPLATES) -> str:
    """A short hash of the templates, for stage keys: edited templates are pooled anew."""
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:12]
