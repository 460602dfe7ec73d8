"""Feature cards (`feature_cards`) on the stand-in Llama: which latents get cards, their scores and
snippets, and the JSON round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import STANDIN_RECORDS as RECORDS, make_random_sae

from saefeatures.activations import ActivationConfig
from saefeatures.directions import EmotionDirections
from saefeatures.feature_cards import build_cards, load_cards
from saefeatures.files import write_json
from saefeatures.sae.scoring import ScoringConfig, score_latents



@pytest.fixture(scope="module")
def scored(tiny_model):
    sae = make_random_sae(d_in=64, d_sae=24, hook="blocks.1.hook_resid_post", seed=1, k=4)
    scores = score_latents(tiny_model, sae, RECORDS, ScoringConfig(warmup_records=6, window=6),
                           ActivationConfig(dtype="float32"))
    return sae, scores


def test_cards_follow_the_directions_weights_and_the_scoring_pass(tiny_model, scored):
    sae, scores = scored
    latents = {"afraid": [(3, 0.2), (7, 0.9), (11, 0.5)], "happy": [(7, 0.4)]}
    dirs = EmotionDirections(["afraid", "happy"], 1, torch.nn.functional.normalize(torch.randn(2, 64), dim=1),
                             recipe="sae-k3", latents=latents)
    cards = build_cards(tiny_model, sae, scores, dirs, RECORDS, per_emotion=2, snippets=2)
    assert [(c.emotion, c.latent) for c in cards] == [("afraid", 7), ("afraid", 11), ("happy", 7)]
    for card in cards:
        c = scores.index(card.emotion)
        assert card.scores["auroc"] == pytest.approx(float(scores.auroc()[c, card.latent]))
        assert card.scores["max"] == pytest.approx(float(scores.max[c, card.latent]))
        assert card.top_emotions[0][1] >= card.top_emotions[-1][1]
        assert len(card.logit_lens) == 10
        for s in card.snippets:
            assert s.record_id in {r.id for r in RECORDS} and len(s.tokens) == len(s.acts) > 0
    for card in cards:  # the first snippet is the latent's highest activation over the whole corpus
        top = float(scores.max[:, card.latent].max())
        if top > 0:
            assert max(card.snippets[0].acts) == pytest.approx(top, abs=1e-3)


def test_latents_that_never_fire_get_cards_without_snippets(tiny_model):
    sae = make_random_sae(d_in=64, d_sae=24, hook="blocks.1.hook_resid_post", seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # a ReLU SAE none of whose latents fires on any token
    scores = score_latents(tiny_model, sae, RECORDS, ScoringConfig(warmup_records=6, window=6),
                           ActivationConfig(dtype="float32"))
    dirs = EmotionDirections(["afraid"], 1, torch.nn.functional.normalize(torch.randn(1, 64), dim=1),
                             recipe="sae-k2", latents={"afraid": [(3, 0.5), (7, 0.5)]})
    cards = build_cards(tiny_model, sae, scores, dirs, RECORDS, per_emotion=2, snippets=2)
    assert [c.latent for c in cards] == [3, 7] and all(c.snippets == [] for c in cards)


def test_cards_round_trip(tiny_model, scored, tmp_path):
    sae, scores = scored
    dirs = EmotionDirections(["calm"], 1, torch.nn.functional.normalize(torch.randn(1, 64), dim=1),
                             recipe="sae-k1", latents={"calm": [(5, 1.0)]})
    cards = build_cards(tiny_model, sae, scores, dirs, RECORDS, per_emotion=1, snippets=1)
    write_json(tmp_path / "cards.json", [c.to_dict() for c in cards])
    assert load_cards(tmp_path / "cards.json") == cards


def test_cards_refuse_records_the_scores_did_not_come_from(tiny_model, scored):
    sae, scores = scored
    dirs = EmotionDirections(["happy"], 1, torch.nn.functional.normalize(torch.randn(1, 64), dim=1),
                             latents={"happy": [(int(scores.max[scores.index("happy")].argmax()), 1.0)]})
    with pytest.raises(ValueError, match="not in the corpus given"):
        build_cards(tiny_model, sae, scores, dirs, RECORDS[:1], per_emotion=1, snippets=3)
