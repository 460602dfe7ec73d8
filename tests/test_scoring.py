from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from saefeatures.activations import ActivationConfig
from saefeatures.directions import EmotionDirections
from saefeatures.sae.assemble import SAERecipeConfig, build_sae, select_latents
from saefeatures.evals.detection import auroc
from saefeatures.sae.scoring import LatentScores, ScoreAccumulator, ScoringConfig, score_latents


@dataclass(frozen=True)
class Rec:
    id: str
    emotion: str
    text: str


TEXTS = {
    "afraid": ["The floorboards creaked again and she held her breath, gripping the phone with both hands.",
               "He kept glancing at the dark window, counting the seconds between the noises outside."],
    "calm": ["She poured the tea slowly and watched the steam curl up into the quiet morning light.",
             "He lay in the grass, breathing evenly, listening to the slow hum of the bees."],
    "happy": ["She laughed and spun around the kitchen when the letter said yes.",
              "He grinned all the way home, humming, and hugged his sister at the door."],
    "neutral": ["The library opens at nine and closes at six on weekdays.",
                "To boil an egg, place it in boiling water for eight minutes."],
}
RECS = [Rec(f"{e}-{i}", e, t) for e, ts in TEXTS.items() for i, t in enumerate(ts)]


def test_planted_latent_is_ranked_first():
    g = torch.Generator().manual_seed(0)
    classes = ["afraid", "calm", "happy", "neutral"]
    acc = ScoreAccumulator(classes, torch.ones(20), "blocks.6.hook_resid_post", [f"r{i}" for i in range(40)],
                           ScoringConfig())
    for b in range(4):
        y = torch.arange(10) % 4
        lat = torch.relu(torch.randn(10, 7, 20, generator=g))  # noise latents fire everywhere
        lat[:, :, 7] = 0
        lat[y == 0, :, 7] = 3.0  # latent 7 fires only on 'afraid'
        mask = torch.ones(10, 7, dtype=torch.bool)
        mask[:, 0] = False
        acc.update(lat, mask, y, torch.arange(10) + 10 * b)
    s = acc.finish()
    assert s.auroc()[0, 7] == pytest.approx(1.0)
    assert s.table("afraid", top=1)[0]["latent"] == 7
    assert select_latents(s, "afraid", 1, SAERecipeConfig()) == [7]
    assert s.firing_rate()[0, 7] == 1.0 and s.firing_rate()[1, 7] == 0.0
    assert s.max[0, 7] == 3.0 and s.max_record[1, 7] == -1


def _scores(values: dict[str, list[list[float]]]) -> LatentScores:
    """Latent scores from per-record pooled values: class -> one row of latent values per record."""
    classes = list(values)
    rows = [(c, v) for c, vs in values.items() for v in vs]
    n_latents = len(rows[0][1])
    acc = ScoreAccumulator(classes, torch.full((n_latents,), 4.0), "blocks.6.hook_resid_post",
                           [f"r{i}" for i in range(len(rows))], ScoringConfig())
    for i, (c, v) in enumerate(rows):
        lat = torch.tensor(v).expand(1, 3, n_latents).clone()
        acc.update(lat, torch.ones(1, 3, dtype=torch.bool), torch.tensor([classes.index(c)]), torch.tensor([i]))
    return acc.finish()


def test_concept_sentences_weigh_in_the_ranking_as_the_dense_recipe_weighs_them():
    # latent 0 reads 'afraid' perfectly in the stories but not in the sentences naming it; latent 1
    # reads it in most stories (selective, AUROC 0.75) and perfectly in the sentences
    stories = _scores({"afraid": [[3, 2], [2.5, 2], [3.5, 0], [3, 2]], "calm": [[0, 0]] * 4, "happy": [[0, 0]] * 3 + [[0, 1]]})
    sentences = _scores({"afraid": [[0, 3]] * 3, "calm": [[0, 0]] * 3, "happy": [[0, 0]] * 3})
    assert stories.auroc()[0, 0] == pytest.approx(1.0) and sentences.auroc()[0, 1] == pytest.approx(1.0)
    cfg = SAERecipeConfig(select="rank")
    assert select_latents(stories, "afraid", 1, cfg) == [0]
    assert select_latents(stories, "afraid", 1, cfg, concepts=sentences, concept_weight=0.0) == [0]
    # (1 + 2 x 0.5) / 3 = 0.67 for latent 0 against (AUROC_stories + 2 x 1) / 3 > 0.9 for latent 1
    assert select_latents(stories, "afraid", 1, cfg, concepts=sentences, concept_weight=2.0) == [1]
    assert select_latents(stories, "afraid", 2, cfg, concepts=sentences, concept_weight=2.0) == [1, 0]
    # an emotion without sentences, or rank_by='output', ranks by the stories alone
    assert select_latents(stories, "afraid", 1, cfg, concepts=_scores({"calm": [[0, 0]], "happy": [[0, 1]]}),
                          concept_weight=2.0) == [0]
    dense = EmotionDirections(["afraid", "calm", "happy"], 6, torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
    dirs = build_sae(stories, torch.eye(2, 4), 1, 6, dense, cfg, concepts=sentences, concept_weight=2.0)
    assert dirs.latents["afraid"] == [(1, 1.0)] and dirs.metadata["concept_weight"] == 2.0
    assert build_sae(stories, torch.eye(2, 4), 1, 6, dense, cfg).metadata["concept_weight"] == 0.0


def test_pursuit_picks_latents_that_rebuild_the_dense_direction_among_the_best_ranked():
    # latents 0-2 read 'afraid' best (mean_diff 5 > 4 > 3) but point almost the same way; latent 3
    # reads it less and points along the part of the dense direction they miss; latent 4 points
    # exactly along it but ranks last
    stories = _scores({"afraid": [[5, 4, 3, 2, 1], [5.5, 4.5, 3.5, 2.5, 1.5]],
                       "calm": [[0] * 5, [0.5] * 5], "happy": [[0] * 5, [0.5] * 5]})
    e = torch.eye(4)
    W_dec = torch.nn.functional.normalize(torch.stack([e[0], e[0] + 0.05 * e[2], e[0] - 0.05 * e[2], e[1],
                                                       e[0] + e[1]]), dim=1)
    target = torch.nn.functional.normalize(e[0] + e[1], dim=0)
    dense = EmotionDirections(["afraid", "calm", "happy"], 6, torch.stack([target, e[2], e[3]]))
    rank = build_sae(stories, W_dec, 2, 6, dense, SAERecipeConfig(rank_by="mean_diff", select="rank"))
    pursuit = build_sae(stories, W_dec, 2, 6, dense, SAERecipeConfig(rank_by="mean_diff", candidates=4))
    assert [i for i, _ in rank.latents["afraid"]] == [0, 1]
    assert float(rank.vector("afraid") @ target) < 0.75
    assert [i for i, _ in pursuit.latents["afraid"]] == [0, 3]
    assert float(pursuit.vector("afraid") @ target) == pytest.approx(1.0, abs=1e-5)
    assert pursuit.metadata["select"] == "pursuit" and pursuit.metadata["candidates"] == 4
    # with latent 4 among the candidates one latent rebuilds the direction, and the pursuit stops there
    wider = build_sae(stories, W_dec, 2, 6, dense, SAERecipeConfig(rank_by="mean_diff", candidates=5))
    assert wider.latents["afraid"] == [(4, 1.0)]
    # no dense direction to rebuild: the top k by rank
    alone = build_sae(stories, W_dec, 2, 6, None, SAERecipeConfig(rank_by="mean_diff", candidates=4))
    assert [i for i, _ in alone.latents["afraid"]] == [0, 1]
    with pytest.raises(ValueError, match="select must be one of"):
        build_sae(stories, W_dec, 2, 6, dense, SAERecipeConfig(select="best"))


def test_the_window_around_each_maximum_is_kept():
    acc = ScoreAccumulator(["afraid", "calm"], torch.ones(2), "blocks.6.hook_resid_post", ["r0", "r1"],
                           ScoringConfig(window=4))
    lat = torch.zeros(2, 7, 2)
    lat[0, :, 0] = torch.arange(7.0)  # peak at the last position: the window is clamped there
    lat[1, :, 1] = torch.tensor([9.0, 0, 5, 1, 0, 0, 0])  # position 0 is masked out: peak at 2
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 0] = False
    acc.update(lat, mask, torch.tensor([0, 1]), torch.tensor([0, 1]))
    s = acc.finish()
    assert s.max_pos[0, 0] == 6 and s.max_window[0, 0].tolist() == [4.0, 5.0, 6.0, 6.0]
    assert s.max_pos[1, 1] == 2 and s.max_window[1, 1].tolist() == [9.0, 0.0, 5.0, 1.0]  # unmasked values


@torch.no_grad()
def _dense_reference(model, sae, recs):
    pooled = []
    for r in recs:
        ids = model.tokenizer(r.text, add_special_tokens=False, return_tensors="pt").input_ids
        _, cache = model.run_with_cache(ids, names_filter=sae.cfg.metadata.hook_name)
        lat = sae.encode(cache[sae.cfg.metadata.hook_name])[0, 1:]
        pooled.append((lat.mean(0), (lat > 0).sum(0), lat.max(0).values))
    return pooled


def test_streaming_statistics_equal_dense_computation(model, random_sae, tmp_path):
    pooling = ActivationConfig(dtype="float32", batch_tokens=64)  # several batches
    s = score_latents(model, random_sae, RECS, ScoringConfig(), pooling)
    ref = _dense_reference(model, random_sae, RECS)
    P = torch.stack([p for p, _, _ in ref])
    labels = np.array([r.emotion for r in RECS])
    for c, name in enumerate(s.classes):
        rows = torch.tensor(labels == name)
        torch.testing.assert_close(s.means()[c].float(), P[rows].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.variances()[c].float(), P[rows].var(0, unbiased=False), atol=1e-4, rtol=1e-3)
        assert torch.equal(s.fire[c], torch.stack([f for (_, f, _), m in zip(ref, rows) if m]).sum(0))
        torch.testing.assert_close(s.max[c], torch.stack([x for (_, _, x), m in zip(ref, rows) if m]).max(0).values,
                                   atol=1e-4, rtol=1e-4)
    emo_rows = labels != "neutral"
    au = s.auroc()
    errors = [abs(au[c, j].item() - auroc(P[emo_rows, j].numpy(), labels[emo_rows] == name))
              for c, name in enumerate(["afraid", "calm", "happy"]) for j in range(random_sae.cfg.d_sae)]
    # 2 positives x 4 negatives: each of the 8 pairs that shares a bin (2.3% of the latent's scale)
    # moves AUROC by 1/16; random latents have many near-equal pooled values.
    assert max(errors) <= 0.125 + 1e-6 and np.mean(errors) < 0.02
    s.save(tmp_path / "s")
    back = LatentScores.load(tmp_path / "s")
    assert back.classes == s.classes and torch.equal(back.hist, s.hist) and torch.equal(back.sum, s.sum)
    assert torch.equal(back.max_window, s.max_window)
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in load_file(str(tmp_path / "s" / "scores.safetensors")).items() if k != "max_window"}
    save_file(old, str(tmp_path / "s" / "scores.safetensors"))  # as an older version wrote them
    with pytest.raises(ValueError, match=r"lacks \['max_window'\].*score again"):
        LatentScores.load(tmp_path / "s")


def test_scoring_pass_fills_the_activation_store(model, random_sae, tmp_path, monkeypatch):
    import saefeatures.activations as A

    acfg = A.ActivationConfig(dtype="float32", shard_records=3)
    hook = random_sae.cfg.metadata.hook_name
    reference = A.collect_pooled(model, RECS, acfg, layers=[6])
    store = A.PooledStore(tmp_path, A.pooling_meta(model, [hook], acfg), acfg.shard_records, records=RECS)
    score_latents(model, random_sae, RECS[:5], ScoringConfig(), replace(acfg, batch_tokens=64), pooled=store)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2  # 5 records, each stored once

    calls = []
    real = A.forward_hooks
    monkeypatch.setattr(A, "forward_hooks", lambda m, tokens, names: calls.append(len(tokens)) or real(m, tokens, names))
    acts = A.collect_pooled(model, RECS, acfg, tmp_path, layers=[6])
    assert sum(calls) == len(RECS) - 5  # only the records the scoring pass did not see
    assert acts.ids == [r.id for r in RECS]
    torch.testing.assert_close(acts[hook], reference[hook], atol=1e-4, rtol=1e-4)


def test_histogram_auroc_is_exact_when_values_fall_in_distinct_bins():
    classes = ["afraid", "calm"]
    acc = ScoreAccumulator(classes, torch.tensor([30.0]), "h", [str(i) for i in range(6)], ScoringConfig())
    vals = [0.0, 1.0, 10.0, 0.0, 5.0, 30.0]  # bins of 30 x 1.5 / 64 = 0.7: all distinct
    ys = [0, 0, 0, 1, 1, 1]
    for v, y in zip(vals, ys):
        lat = torch.tensor([[[0.0], [v]]])
        acc.update(lat, torch.tensor([[False, True]]), torch.tensor([y]), torch.tensor([0]))
    exact = auroc(np.array(vals), np.array(ys) == 0)
    assert acc.finish().auroc()[0, 0].item() == pytest.approx(exact)


def test_sae_directions_selection_weights_and_layer_check(model, random_sae):
    s = score_latents(model, random_sae, RECS, ScoringConfig(), ActivationConfig(dtype="float32", max_tokens=40,
                                                                                   skip_first=3))
    dense = EmotionDirections(["afraid", "calm", "happy"], 6, torch.nn.functional.normalize(torch.randn(3, 576), dim=1))
    for weighting, select in (("lstsq", "pursuit"), ("lstsq", "rank"), ("score", "pursuit"), ("score", "rank")):
        dirs = build_sae(s, random_sae.W_dec, 4, 6, dense,
                         SAERecipeConfig(weighting=weighting, min_cohens_d=0.0, select=select))
        assert dirs.names == ["afraid", "calm", "happy"] and dirs.recipe == "sae-k4"
        # they read new texts as the latents were scored
        assert dirs.metadata["pooling"] == {"hook": "blocks.6.hook_resid_post", "layer": 6, "max_tokens": 40,
                                            "skip_first": 3, "dtype": "float32"}
        for name in dirs.names:
            ids = [i for i, _ in dirs.latents[name]]
            w = torch.tensor([x for _, x in dirs.latents[name]])
            assert 1 <= len(ids) <= 4 and (w >= 0).all() and w.sum() == pytest.approx(1.0)
            v = (w[:, None] * random_sae.W_dec[ids].detach()).sum(0)
            torch.testing.assert_close(dirs.vector(name), v / v.norm())
            diffs = s.mean_diff()[s.index(name)][ids]
            assert (diffs > 0).all()
    wrong = EmotionDirections(["afraid"], 7, torch.ones(1, 576) / 24)
    with pytest.raises(ValueError, match="SAE layer 6 != dense directions layer 7"):
        build_sae(s, random_sae.W_dec, 4, 6, wrong)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        select_latents(s, "afraid", 2, SAERecipeConfig(rank_by="magic"))
    with pytest.raises(KeyError, match="not scored"):
        s.index("proud")
