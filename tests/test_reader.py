"""The reader test: directions reading an external story set, z-scored per direction."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saefeatures.activations import ActivationConfig, collect_pooled
from saefeatures.directions import EmotionDirections, build_dense
from saefeatures.evals.reader import read_stories, readable, score_reading, zscore_columns
from saefeatures.corpus_import import read_story_set

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion-vector-bench" / "stories"
NAMES = ["joyful", "terrified", "depressed", "furious"]


def _crafted(separable: bool, n: int = 40, seed: int = 0) -> tuple[EmotionDirections, torch.Tensor, list[str]]:
    """Directions = class means of one sample, read on a second sample of the same classes (or of
    labels shuffled against the activations)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(NAMES), 16, generator=g) * 2

    def sample():
        y = torch.arange(len(NAMES)).repeat(n)
        return centers[y] + torch.randn(len(y), 16, generator=g), [NAMES[i] for i in y]

    train, train_labels = sample()
    if not separable:
        train_labels = list(np.random.default_rng(seed).permutation(train_labels))
    dirs = build_dense(train, train_labels, torch.zeros(0, 16), layer=3)
    test, labels = sample()
    return dirs, test, labels


def test_separable_set_reads_high_and_shuffled_reads_chance():
    dirs, acts, labels = _crafted(separable=True)
    res = score_reading(dirs.project(acts).numpy(), labels, dirs.names)
    assert res.top1 > 0.95 and res.auroc > 0.98 and res.top3 == 1.0 and res.n == len(labels)
    dirs, acts, labels = _crafted(separable=False)
    res = score_reading(dirs.project(acts).numpy(), labels, dirs.names)
    assert res.top1 < 0.45 and 0.35 < res.auroc < 0.65, res.metrics()  # chance: 0.25 and 0.5
    assert set(res.metrics()) == {"top1", "top3", "auroc", "n", "n_emotions"}


def test_zscoring_per_direction_removes_a_direction_that_reads_high_everywhere():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    scores = rng.normal(size=(40, 4)) * 0.1 + np.eye(4)[y]
    scores[:, 0] += 100.0  # without standardising, 'joyful' would win every argmax
    assert (scores.argmax(1) == 0).all()
    res = score_reading(scores, [NAMES[i] for i in y], NAMES)
    assert res.top1 == 1.0
    z = zscore_columns(np.c_[scores, np.ones(40)])
    assert np.allclose(z[:, :4].mean(0), 0) and np.allclose(z[:, :4].std(0), 1) and (z[:, 4] == 0).all()


def test_readable_skips_unknown_and_needs_two_in_common(tmp_path):
    dirs, _, _ = _crafted(separable=True)
    rows = [{"emotion": e, "topic": "t", "text": "x"} for e in ("joyful", "terrified", "hopeless")]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, known, skipped = readable(dirs, read_story_set(tmp_path / "s.jsonl"))
    assert known == ["joyful", "terrified"] and skipped == ["hopeless"] and len(kept) == 2
    with pytest.raises(ValueError, match="at least 2 in common"):
        readable(dirs.subset(["joyful"]), read_story_set(tmp_path / "s.jsonl"))


@pytest.mark.dtype  # the stories are read in the dtype 'auto' resolves to
@pytest.mark.skipif(not BENCH.is_dir(), reason="needs ../shared/data/emotion-vector-bench")
def test_read_stories_with_the_model(model, tmp_path):
    """Directions from some of emotion-vector-bench's topics read stories of its other topics well
    (and, built from shuffled labels, at chance); pooled rows are cached and reused."""
    emotions = ["joyful", "terrified", "depressed"]
    stories = [s for s in read_story_set(BENCH) if s.emotion in emotions]
    topics = sorted({s.topic for s in stories})
    train = [s for s in stories if s.topic in topics[:8] and s.index < 1]
    held = [s for s in stories if s.topic in topics[10:] and s.index < 2] + \
        [s for s in read_story_set(BENCH / "hopeless.jsonl")][:2]
    (tmp_path / "held.jsonl").write_text("".join(
        json.dumps({"emotion": s.emotion, "topic": s.topic, "text": s.text}) + "\n" for s in held))
    cfg = ActivationConfig(max_tokens=64, skip_first=8)
    acts = collect_pooled(model, train, cfg, layers=[20])["blocks.20.hook_resid_post"]
    labels = [s.emotion for s in train]
    dirs = build_dense(acts, labels, acts[:0], 20)
    shuffled = build_dense(acts, list(np.random.default_rng(0).permutation(labels)), acts[:0], 20)
    res = read_stories(model, {"dense": dirs, "shuffled": shuffled}, tmp_path / "held.jsonl", cfg, tmp_path / "cache")
    assert res["dense"].skipped == ["hopeless"] and res["dense"].n == 3 * 5 * 2
    assert res["dense"].top1 > 0.7 and res["dense"].auroc > 0.85, res["dense"].metrics()  # measured 0.90, 0.93
    assert res["shuffled"].auroc < 0.75, res["shuffled"].metrics()
    shards = list((tmp_path / "cache").rglob("shard-*.safetensors"))
    assert len(shards) == 1
    mtime = shards[0].stat().st_mtime_ns
    again = read_stories(model, {"dense": dirs}, tmp_path / "held.jsonl", cfg, tmp_path / "cache", per_emotion=4)
    assert again["dense"].n == 3 * 4 and shards[0].stat().st_mtime_ns == mtime  # read back, not recomputed
