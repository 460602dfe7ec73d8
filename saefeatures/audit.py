"""Corpus audit: how well the words alone tell a corpus's emotions apart, with no model.

A bag-of-words logistic regression (scikit-learn: tf-idf of word unigrams and bigrams, multinomial)
is trained on the stories of the train topics and reads the stories of the held-out test topics.
Its scores bound what any direction can find in the text: a corpus whose stories carry valence
but not their emotion scores near chance here, whatever the model's activations. Reported like
held-out detection: top-1, top-5, mean one-vs-rest AUROC, and the share of predictions in the
true emotion's cluster (the paper's 10). A prefilled opening that names the emotion (recipe
'prefill', ``generation['prefill']``) is left out: the audit reads what the model wrote.

Example:
    >>> from saefeatures.corpus import load_corpus
    >>> audit_corpus(load_corpus()).metrics()   # {'bow_top1': ..., 'bow_auroc': ..., ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from .corpus import NON_EMOTION, CorpusRecord
from .evals.detection import evaluate_scores


@dataclass
class AuditConfig:
    """The bag-of-words classifier and the splits it trains and reads on."""

    train_split: str = "train"
    """Stories of these topics train the classifier."""
    test_split: str = "test"
    """Stories of these (held-out) topics are read."""
    ngram_max: int = 2
    """Word n-grams up to this length."""
    min_df: int = 2
    """Words (n-grams) in fewer train stories than this are left out."""
    c: float = 10.0
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = 300
    """L-BFGS iterations."""


@dataclass
class AuditResult:
    """The classifier's held-out reading of a corpus (chance top-1 is 1 / n_classes)."""

    top1: float
    top5: float
    auroc: float
    cluster_acc: float | None
    n_train: int
    n_test: int
    n_classes: int
    per_emotion: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The ``corpus.bow_*`` keys of metrics.json."""
        out = {"bow_top1": self.top1, "bow_top5": self.top5, "bow_auroc": self.auroc,
               "bow_n_test": float(self.n_test), "bow_n_classes": float(self.n_classes)}
        if self.cluster_acc is not None:
            out["bow_cluster_acc"] = self.cluster_acc
        return out

    def to_dict(self) -> dict:
        return {**self.metrics(), "n_train": self.n_train, "per_emotion": self.per_emotion}


def written(record: CorpusRecord) -> str:
    """The record's text without the prefilled opening the model was given (if any)."""
    prefill = record.generation.get("prefill", "")
    return record.text[len(prefill):] if prefill and record.text.startswith(prefill) else record.text


def audit_corpus(records: Sequence[CorpusRecord], cfg: AuditConfig = AuditConfig()) -> AuditResult:
    """Train on ``cfg.train_split``'s emotion stories, read ``cfg.test_split``'s; neutral and general
    texts are left out, as are test stories of emotions without train stories."""
    stories = [r for r in records if r.emotion not in NON_EMOTION]
    train = [r for r in stories if r.split == cfg.train_split]
    classes = sorted({r.emotion for r in train})
    test = [r for r in stories if r.split == cfg.test_split and r.emotion in set(classes)]
    if len(classes) < 2 or not test:
        raise ValueError(f"The audit needs stories of at least 2 emotions in split '{cfg.train_split}' and of "
                         f"those emotions in split '{cfg.test_split}'; got {len(classes)} emotions, {len(test)} "
                         "test stories. Check the corpus's split fields (`saefeatures corpus stats`).")
    vec = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=True)
    x_train = vec.fit_transform([written(r) for r in train])
    clf = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter)
    clf.fit(x_train, [r.emotion for r in train])
    scores = clf.predict_log_proba(vec.transform([written(r) for r in test]))
    det = evaluate_scores(np.asarray(scores), [r.emotion for r in test], list(clf.classes_))
    return AuditResult(det.top1, det.top5, det.auroc, det.cluster_acc, len(train), len(test), len(classes),
                       det.per_emotion)
