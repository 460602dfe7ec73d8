"""saefeatures: sparse-autoencoder features behind emotion concepts in language models.

The user story in a few calls (each below is a typed function; it imports its module when first
called, so ``import saefeatures`` stays light):

    >>> import saefeatures as sf
    >>> model = sf.load_model("smollm2-135m-instruct")
    >>> dense = sf.dense_directions(model)                      # one unit vector per emotion
    >>> dense.read(model, ["I can't stop smiling today."])[0]["happy"]
    >>> sae = sf.load_sae(None, model, layer=18)                # the shipped SAE
    >>> sae_dirs = sf.sae_directions(model, sae, dense, k=16)   # the same, assembled from SAE latents
    >>> happy = sf.emotion_steering(model, dense, emotions={"happy": 0.3})
    >>> with happy.applied(model):                              # TransformerLens hooks, inside the with only
    ...     model.generate("Tell me about your day.", max_new_tokens=20)
    >>> sf.generate_steered(model, happy, ["Tell me about your day."])   # the fast HF path
    >>> sf.monitor_chat(model, dense, [{"role": "user", "content": "I took 16000 mg of Tylenol."}])

The study behind the paper's numbers is ``saefeatures run CONFIG --out DIR`` (`saefeatures.study`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from .directions import EmotionDirections
    from .monitor import Trace
    from .steering import Steering

__version__ = "0.1.0"
__all__ = ["dense_directions", "emotion_steering", "generate_steered", "load_directions", "load_model", "load_sae",
           "monitor_chat", "sae_directions"]


def load_model(name_or_path: str = "smollm2-135m-instruct", **options: Any) -> HookedTransformer:
    """A HookedTransformer (with its HF twin kept, for fast generation) whose tokenizer carries the
    chat template; see `models.load_model` for ``dtype``, ``device`` and the rest."""
    from .models import load_model as load

    return load(name_or_path, **options)


def load_sae(spec: Any = None, model: HookedTransformer | None = None, layer: int | None = None) -> SAE:
    """An SAE checked against ``model`` at ``layer``: None (the shipped one), a SAELens directory, a
    (release, sae_id) pair or an `SAEConfig`; see `sae.load_sae`. `sae.train_sae` trains one."""
    from .sae import load_sae as load

    return load(spec, model, layer)


def load_directions(path: str | Path) -> EmotionDirections:
    """Emotion directions saved by `EmotionDirections.save` (e.g. ``RUN/directions/dense``)."""
    from .directions import EmotionDirections

    return EmotionDirections.load(path)


def dense_directions(model: HookedTransformer, records: Sequence | None = None, layer: int | None = None
                     ) -> EmotionDirections:
    """The paper's dense directions from the train split of ``records`` (default: the shipped corpus):
    per-emotion mean of pooled activations minus the mean over emotions, neutral components out,
    plus the direction of short sentences naming each emotion (`saefeatures.concepts`)."""
    from .activations import ActivationConfig, collect_pooled
    from .concepts import concept_sentences
    from .corpus import load_corpus
    from .directions import DirectionConfig, build_dense
    from .hook_names import hook_name
    from .models import model_identity, resolve_layer

    layer = resolve_layer(layer, model_identity(model).name, model.cfg.n_layers)
    train = [r for r in (records if records is not None else load_corpus()) if r.split == "train"]
    acts = collect_pooled(model, train, ActivationConfig(), layers=[layer], desc="dense directions")
    emotional = [r for r in train if r.emotion != "neutral"]
    neutral = [r.id for r in train if r.emotion == "neutral"]
    hook = hook_name(layer)
    anchors = concept_sentences(sorted({r.emotion for r in emotional}))
    concepts = collect_pooled(model, anchors, ActivationConfig(), layers=[layer], desc="concept sentences")
    return build_dense(acts.subset([r.id for r in emotional])[hook], [r.emotion for r in emotional],
                       acts.subset(neutral)[hook], layer, DirectionConfig(), hook,
                       concepts=(concepts[hook], [s.emotion for s in anchors]))


def sae_directions(model: HookedTransformer, sae: SAE, dense: EmotionDirections, k: int = 16,
                   records: Sequence | None = None) -> EmotionDirections:
    """Directions assembled from ``k`` SAE latents per emotion: among those that read the emotion
    best on the train split of ``records`` (default: the shipped corpus) and on sentences naming it
    (weighted as ``dense`` weighted them), the ones that together rebuild ``dense`` (`sae.assemble`)."""
    from .concepts import concept_sentences
    from .corpus import load_corpus
    from .sae.assemble import SAERecipeConfig, build_sae
    from .sae import ScoringConfig, score_latents

    train = [r for r in (records if records is not None else load_corpus()) if r.split == "train"]
    scores = score_latents(model, sae, train, ScoringConfig())
    weight = dense.metadata.get("concept_weight", 0.0)
    emotions = [c for c in scores.classes if c != "neutral"]
    concepts = score_latents(model, sae, concept_sentences(emotions), ScoringConfig(),
                             desc="concept scoring") if weight > 0 else None
    return build_sae(scores, sae.W_dec, k, dense.layer, dense, SAERecipeConfig(), concepts=concepts,
                     concept_weight=weight)


def emotion_steering(model: HookedTransformer, directions: EmotionDirections | None = None, sae: SAE | None = None,
                     **spec: Any) -> Steering:
    """A `Steering` resolved from `SteeringSpec` fields (``emotions={"happy": 0.3}``, ``latents``,
    ``method``, ``positions``...); attach it with ``with steering.applied(model): ...``."""
    from .steering import Steering, SteeringSpec

    return Steering.from_spec(SteeringSpec(**spec), model, directions=directions, sae=sae)


def generate_steered(model: HookedTransformer, steering: Steering | None, prompts: Sequence[str],
                     **options: Any) -> list[str]:
    """Replies to chat ``prompts`` with ``steering`` attached (fast HF path by default); see
    `steering.generate_steered` for ``max_new_tokens``, ``temperature``, ``backend``..."""
    from .steering import generate_steered as generate

    return generate(model, steering, prompts, **options)


def monitor_chat(model: HookedTransformer, directions: EmotionDirections,
                 messages: Sequence[dict[str, str]]) -> Trace:
    """Every emotion's projection at every token of a chat (`monitor.trace_chat`); `monitor.calibrate`
    and `monitor.alarms` turn it into alarms."""
    from .monitor import trace_chat

    return trace_chat(model, directions, messages)
