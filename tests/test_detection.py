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


def test_display12_and_cluster_accuracy():
    from saefeatures.evals.detection import CLUSTERS

    names = ["happy", "joyful", "afraid", "terrified"]  # happy, afraid: display emotions
    assert CLUSTERS["happy"] == CLUSTERS["joyful"] != CLUSTERS["afraid"] == CLUSTERS["terrified"]
    scores = np.array([
        [1, 5, 0, 0],  # happy read as joyful: wrong, right cluster; among display: happy (right)
        [0, 0, 1, 5],  # afraid read as terrified: wrong, right cluster; among display: afraid (right)
        [0, 0, 5, 1],  # afraid: right
        [0, 5, 0, 1],  # terrified read as joyful: wrong cluster
    ], float)
    res = evaluate_scores(scores, ["happy", "afraid", "afraid", "terrified"], names)
    assert res.top1 == 0.25
    assert res.top1_display12 == 1.0  # only happy and afraid records, choosing between those two
    assert res.cluster_acc == 0.75
    assert {"top1_display12", "cluster_acc"} <= res.metrics().keys()
    scores[0] = [0, 5, 1, 0]  # among the display emotions, happy (0) now loses to afraid (1)
    assert evaluate_scores(scores, ["happy", "afraid", "afraid", "terrified"], names).top1_display12 == 2 / 3


def test_coarse_metrics_absent_when_not_computable():
    res = evaluate_scores(np.eye(3), ["a", "b", "c"], ["a", "b", "c"])  # not the paper's emotions
    assert res.cluster_acc is None and res.top1_display12 is None
    assert res.metrics().keys() == {"top1", "top5", "auroc"}
