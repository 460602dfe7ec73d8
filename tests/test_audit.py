"""The model-free corpus audit on tiny crafted corpora: separable emotions score high, shuffled ones chance."""

import random

import pytest

from saefeatures.audit import audit_corpus
from saefeatures.corpus import CorpusRecord

EMOTIONS = ("happy", "joyful", "afraid", "terrified", "angry", "sad")
FILLER = "the a she he walked room table window door morning street car phone letter bag chair kitchen".split()
TOPIC_SPLIT = {f"topic{i}": "train" if i < 8 else "val" if i < 9 else "test" for i in range(12)}


def _record(i: int, emotion: str, topic: str, text: str) -> CorpusRecord:
    return CorpusRecord(id=f"r{i}", emotion=emotion, topic=topic, kind="story", split=TOPIC_SPLIT[topic],
                        prompt="", text=text, model_id="test", seed=0)


def _corpus(separable: bool, seed: int = 0) -> list[CorpusRecord]:
    """Six emotions x 12 topics x 3 stories; each emotion owns a few words (when separable), topics
    add words of their own, and every story is mostly shared filler."""
    rng = random.Random(seed)
    own = {e: [f"{e}word{k}" for k in range(4)] for e in EMOTIONS}
    records = []
    for topic in TOPIC_SPLIT:
        for e in EMOTIONS:
            for _ in range(3):
                words = rng.choices(FILLER, k=30) + [topic + "thing"] * 3
                words += rng.choices(own[e] if separable else [w for ws in own.values() for w in ws], k=4)
                rng.shuffle(words)
                records.append(_record(len(records), e, topic, " ".join(words)))
    return records


def test_separable_corpus_scores_high():
    res = audit_corpus(_corpus(separable=True))
    assert res.n_classes == 6 and res.n_test == 3 * 3 * 6 and res.n_train == 8 * 3 * 6
    assert res.top1 > 0.9 and res.auroc > 0.95 and res.top5 == 1.0
    assert res.cluster_acc >= res.top1
    m = res.metrics()
    assert {"bow_top1", "bow_top5", "bow_auroc", "bow_cluster_acc"} <= m.keys()
    assert all(isinstance(v, float) for v in m.values())


def test_shuffled_corpus_scores_chance():
    records = _corpus(separable=True)
    labels = [r.emotion for r in records]
    random.Random(1).shuffle(labels)  # the words no longer go with the labels
    shuffled = [_record(i, e, r.topic, r.text) for i, (r, e) in enumerate(zip(records, labels))]
    for corpus in (shuffled, _corpus(separable=False)):
        res = audit_corpus(corpus)
        assert res.top1 < 0.4 and 0.3 < res.auroc < 0.7, res.metrics()  # chance: 1/6 and 0.5


def test_audit_ignores_neutral_and_needs_both_splits():
    records = _corpus(separable=True)
    neutral = _record(10_000, "neutral", "topic0", "plain words about a table")
    assert audit_corpus([*records, neutral]).n_train == audit_corpus(records).n_train
    with pytest.raises(ValueError, match="split 'test'"):
        audit_corpus([r for r in records if r.split != "test"])


def test_prefilled_openings_naming_the_emotion_are_not_read():
    """Recipe 'prefill' starts each reply with "X felt {emotion} because": the audit must read only
    what the model wrote after it, or every prefilled corpus would audit perfectly."""
    import dataclasses

    records = []
    for r in _corpus(separable=False):
        prefill = f"Sam felt {r.emotion} because"
        records.append(dataclasses.replace(r, text=f"{prefill} {r.text}", generation={"prefill": prefill}))
    res = audit_corpus(records)
    assert res.top1 < 0.4 and 0.3 < res.auroc < 0.7, res.metrics()
    named = [dataclasses.replace(r, generation={}) for r in records]  # the same texts, opening not marked
    assert audit_corpus(named).top1 > 0.9
