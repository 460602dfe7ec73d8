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


def _ten_emotions(seed=0, signal=2.0, per=4):
    names = ["happy", "sad", "afraid", "calm", "angry", "grateful", "bored", "proud", "desperate", "excited"]
    labels = [n for n in names for _ in range(per)]
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(len(labels), len(names))) + signal * np.eye(len(names))[[names.index(x) for x in labels]]
    return scores, labels, names


def test_confusion_matrices_cover_the_10_clusters_and_12_display_emotions():
    from saefeatures import emotions as emo
    from saefeatures.evals.detection import CLUSTER_NAMES

    scores, labels, names = _ten_emotions()
    res = evaluate_scores(scores, labels, names)
    clusters, display = np.array(res.confusion_clusters["matrix"]), np.array(res.confusion_display["matrix"])
    assert clusters.shape == (10, 10) and res.confusion_clusters["labels"] == list(CLUSTER_NAMES)
    assert display.shape == (12, 12) and res.confusion_display["labels"] == list(emo.DISPLAY)
    per_cluster = {c: sum(emo.get(x).cluster == c for x in labels) for c in CLUSTER_NAMES}
    assert clusters.sum(1).tolist() == [per_cluster[c] for c in CLUSTER_NAMES]  # rows: the true cluster's records
    assert display.sum(1).tolist() == [labels.count(d) for d in emo.DISPLAY]
    assert np.trace(clusters) / clusters.sum() == pytest.approx(res.cluster_acc)
    assert np.trace(display) / display.sum() == pytest.approx(res.top1_display12)


def test_accuracy_intervals_and_label_shuffled_nulls():
    strong = evaluate_scores(*_ten_emotions(signal=3.0))
    for key in ("top1", "cluster_acc", "top1_display12"):
        value = getattr(strong, key)
        assert strong.ci[key]["lower"] <= value <= strong.ci[key]["upper"], key
        assert strong.null[key]["percentile"] > 95 and strong.null[key]["p95"] < value, key
    noise = evaluate_scores(*_ten_emotions(signal=0.0, per=20))
    assert 0.05 < noise.null["top1"]["mean"] < 0.15 and 5 < noise.null["top1"]["percentile"] < 95
    assert evaluate_scores(*_ten_emotions(signal=3.0)).ci == strong.ci  # fixed seed


def test_own_emotion_and_neutral_read_outs():
    import torch

    from saefeatures.directions import EmotionDirections
    from saefeatures.evals.detection import evaluate

    dirs = EmotionDirections(["happy", "sad"], 0, torch.eye(2))
    acts = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, -3.0]])  # sad's records read below neutral
    res = evaluate(dirs, acts, ["happy", "happy", "sad", "sad"], neutral_acts=torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert res.per_emotion["happy"]["own_mean"] == 1.5 and res.per_emotion["happy"]["neutral_mean"] == 0.0
    assert res.per_emotion["sad"]["own_mean"] == -2.0 and res.per_emotion["sad"]["neutral_mean"] == 0.5
    assert res.n_below_neutral == 1 and res.metrics()["n_below_neutral"] == 1.0
    assert evaluate(dirs, acts, ["happy", "happy", "sad", "sad"]).n_below_neutral is None
