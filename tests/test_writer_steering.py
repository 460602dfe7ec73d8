"""Steering the writer of the corpus (`saefeatures.writer_steering`, ``corpus.build.steer``), on the
embedded model: the residual norm it scales by, the steered build, and its resume."""

import pytest
import torch

from saefeatures import corpus as C
from saefeatures import corpus_build as B
from saefeatures.activations import ActivationConfig, collect_pooled
from saefeatures.concepts import ConceptSentence, concept_sentences
from saefeatures.directions import DirectionConfig, build_dense
from saefeatures.generation import GenerationConfig, Generator
from saefeatures.models import hf_twin
from saefeatures.neutral import NEUTRAL_TEXTS
from saefeatures.steering.intervention import residual_norm

LAYER = 18
HOOK = f"blocks.{LAYER}.hook_resid_post"
EMOTIONS = ["afraid", "happy"]


def test_hf_residual_norm_is_the_steering_norm(model):
    from saefeatures.writer_steering import hf_residual_norm

    assert hf_residual_norm(hf_twin(model), model.tokenizer, HOOK) == pytest.approx(residual_norm(model, HOOK), rel=1e-4)


@pytest.fixture(scope="module")
def directions_dir(model, tmp_path_factory):
    """Dense directions of afraid and happy at layer 18 from the concept sentences, saved."""
    sentences = concept_sentences(EMOTIONS)
    cfg = ActivationConfig(dtype="float32")
    acts = collect_pooled(model, sentences, cfg, layers=[LAYER], progress=False)[HOOK]
    neutral = collect_pooled(model, [ConceptSentence(f"n{i}", "neutral", t) for i, t in enumerate(NEUTRAL_TEXTS)],
                             cfg, layers=[LAYER], progress=False)[HOOK]
    dirs = build_dense(acts, [s.emotion for s in sentences], neutral, LAYER, DirectionConfig(neutral_variance=0.0))
    path = tmp_path_factory.mktemp("steer") / "dense"
    dirs.save(path)
    return path


def _cfg(directions_dir, steer: float) -> B.CorpusConfig:
    return B.CorpusConfig(emotions=EMOTIONS, stories_per_emotion=2, neutral_per_topic=0, topics=12, min_words=5,
                          steer=steer, steer_directions=str(directions_dir),
                          generation=GenerationConfig(max_new_tokens=24, batch_size=4, dtype="float32"))


def _own_margin(model, records, dirs) -> float:
    """Mean over records of the projection on its own emotion's direction minus the other's."""
    acts = collect_pooled(model, records, ActivationConfig(dtype="float32"), layers=[LAYER], progress=False)[HOOK]
    proj = dirs.project(acts)
    own = torch.tensor([dirs.index(r.emotion) for r in records])
    return float((proj.gather(1, own[:, None]) * 2 - proj.sum(1, keepdim=True)).mean())


@pytest.mark.slow
def test_steered_build_writes_toward_each_emotion_and_records_it(model, directions_dir, tmp_path):
    from saefeatures.directions import EmotionDirections

    gen = Generator(hf_twin(model), model.tokenizer, _cfg(directions_dir, 0).generation)
    plain, steered = tmp_path / "plain.jsonl", tmp_path / "steered.jsonl"
    B.build_corpus(_cfg(directions_dir, 0.0), plain, gen, "m")
    B.build_corpus(_cfg(directions_dir, 0.3), steered, gen, "m")
    p, s = list(C.read_records(plain)), list(C.read_records(steered))
    assert [r.id for r in p] == [r.id for r in s] and [r.prompt for r in p] == [r.prompt for r in s]
    assert all("steer" not in r.generation for r in p)
    note = s[0].generation["steer"]
    assert note["strength"] == 0.3 and note["hook"] == HOOK and len(note["directions"]) == 12
    assert all(r.generation["steer"] == note for r in s)
    assert [r.text for r in p] != [r.text for r in s]  # same seeds: the steering changed what was written
    dirs = EmotionDirections.load(directions_dir)
    # read unsteered, the steered texts lean further toward their own emotion than the plain ones
    assert _own_margin(model, s, dirs) > _own_margin(model, p, dirs)


@pytest.mark.slow
def test_resumed_steered_build_loses_and_duplicates_nothing(model, directions_dir, tmp_path, monkeypatch):
    gen = Generator(hf_twin(model), model.tokenizer, _cfg(directions_dir, 0.1).generation)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    B.build_corpus(_cfg(directions_dir, 0.1), full, gen, "m")
    real, calls = gen.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        B.build_corpus(_cfg(directions_dir, 0.1), part, gen, "m")
    assert len(B.done_batches(part)) == 1
    monkeypatch.setattr(gen, "generate", real)
    B.build_corpus(_cfg(directions_dir, 0.1), part, gen, "m")
    resumed, whole = list(C.read_records(part)), list(C.read_records(full))
    assert sorted(r.id for r in resumed) == sorted(r.id for r in whole)  # nothing lost, nothing twice
    assert {r.id: (r.text, r.generation["steer"]) for r in resumed} == {r.id: (r.text, r.generation["steer"])
                                                                        for r in whole}


def test_writer_steering_needs_emotion_batches(directions_dir):
    cfg = _cfg(directions_dir, 0.1)
    neutral_only = [b for b in B.plan_corpus(cfg) if b.emotion in C.NON_EMOTION]
    assert B.writer_steering(cfg, None, neutral_only) is None  # nothing to steer: no model work
    assert B.writer_steering(_cfg(directions_dir, 0.0), None, B.plan_corpus(cfg)) is None
