import numpy as np
import pytest

from saefeatures.evals.detection import auroc, evaluate_scores


def _reference_auroc(scores, pos):
    p, n = scores[pos], scores[~pos]
    return np.mean([(x > y) + 0.5 * (x == y) for x in p for y in n])


def test_auroc_matches_pairwise_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = np.round(rng.normal(size=60), 1)  # with ties
        pos = rng.random(60) < 0.3
        assert auroc(s, pos) == pytest.approx(_reference_auroc(s, pos))
    assert np.isnan(auroc(np.arange(5.0), np.zeros(5, bool)))


def test_topk_and_per_emotion():
    names = ["a", "b", "c"]
    scores = np.array([[3, 2, 1], [1, 3, 2], [3, 1, 2], [0, 1, 2]], float)
    labels = ["a", "b", "c", "c"]
    res = evaluate_scores(scores, labels, names)
    assert res.top1 == pytest.approx(0.75)
    assert res.top5 == 1.0
    assert res.per_emotion["c"]["top1"] == 0.5 and res.per_emotion["c"]["n"] == 2
    assert res.per_emotion["a"]["auroc"] == pytest.approx(_reference_auroc(scores[:, 0], np.array([1, 0, 0, 0], bool)))
    with pytest.raises(ValueError, match="Labels without a direction"):
        evaluate_scores(scores, ["a", "b", "c", "z"], names)
