"""Presentation (`report`): the run page from a run directory's files, feature cards as HTML, the
monitor's heat-map and the steering figures, without a model."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import torch

from saefeatures.evals.dose_response import Curve, CurvePoint
from saefeatures.evals.pressure import PressureResult
from saefeatures.evals.steering_suite import SteeringResult
from saefeatures.feature_cards import FeatureCard, Snippet
from saefeatures.files import write_json
from saefeatures.monitor import Trace
from saefeatures.report.cards import cards_html, cards_page
from saefeatures.report.monitor import trace_html
from saefeatures.report.page import build_report, sae_recipe, write_report
from saefeatures.report.steering import save_steering_plots, steering_figures

CARD = FeatureCard(12, "afraid", 0.7, {"auroc": 0.81, "cohens_d": 1.2}, [("afraid", 3.0), ("calm", 0.5)],
                   ["fear", "<b>"], [Snippet("r1", "afraid", ["She", " <froze>"], [0.5, 2.0])])


def test_the_page_shows_the_run_metrics_sections_and_cards(tmp_path):
    metrics = {"model": {"id": "tiny", "layer": 2}, "timings": {"scoring_s": 12.5, "total_s": 30.0},
               "corpus": {"n_stories": 10.0, "bow_top1": 0.25, "bow_top5": 0.5, "bow_auroc": 0.7},
               "dense": {"top1": 0.125, "auroc": 0.625, "valence_r": 0.5},
               "sae": {"k4": {"top1": 0.25, "auroc": 0.75}, "l0": 32.0},
               "steering": {"happy": {"dense": {"judge_valence_spearman": 0.9}}, "residual_norm": 3.0}}
    write_json(tmp_path / "metrics.json", metrics)
    write_json(tmp_path / "manifest.json", {"started": "today", "smoke": {"prompt": "Hi <there>", "reply": "Hello"}})
    (tmp_path / "figures").mkdir()
    write_json(tmp_path / "figures" / "cards.json", [CARD.to_dict()])
    page = build_report(tmp_path)
    assert "saefeatures report: tiny, layer 2" in page
    assert "Hi &lt;there&gt;" in page and "<there>" not in page  # text from files is escaped
    for shown in ("0.125", "0.625", "0.750", "12.500", "Corpus audit", "Feature cards", "latent 12",
                  "happy.dense.judge_valence_spearman", "0.900"):
        assert shown in page, shown
    assert "sae.k16" not in page  # sections the run does not have are left out
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html" and path.read_text() == page


def test_cards_html_groups_by_emotion_and_escapes_tokens():
    html = cards_html([CARD, FeatureCard(3, "calm", 0.2, {"auroc": 0.6}, [], [])])
    assert html.count("<details>") == 2 and "afraid (1 latents)" in html
    assert "&lt;froze&gt;" in html and "<froze>" not in html and "<code>&lt;b&gt;</code>" in html
    assert "rgba(255,120,0,1.00)" in html and "rgba(255,120,0,0.25)" in html  # activation / max as opacity
    assert cards_page([CARD], "Cards <L2>").startswith("<html>") and "Cards &lt;L2&gt;" in cards_page([CARD], "Cards <L2>")


def test_trace_html_colours_each_token_by_sign_and_size():
    trace = Trace(["<s>", "I", " fear", " tea"], [0, 1, 2, 3], ["user"] * 4, [0] * 4, [False, True, True, True],
                  ["afraid", "calm"], torch.tensor([[9.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]]))
    html = trace_html(trace, "afraid")
    assert "<b>[user]</b>" in html and "&lt;s&gt;" in html
    assert "rgba(220,40,40,1.00)' title='afraid: 2.00'" in html  # the largest after the first token: full red
    assert "rgba(40,80,220,0.50)' title='afraid: -1.00'" in html  # negative: blue, half as strong


def test_steering_figures_and_files(tmp_path):
    points = [CurvePoint(s, 0.1 * s, 5 + s, 4.0, 8, 10.0, 1 + s, 0.0, "text") for s in (0.0, 0.1, 0.2)]
    result = SteeringResult([Curve("happy", "dense", points)], None,
                            PressureResult(["desperate"], {"desperate": [0.1, 0.3]}, {"desperate": [0.1, 0.1]}),
                            norm=3.0, hook="blocks.1.hook_resid_post")
    figs = steering_figures(result)
    assert set(figs) == {"dose_response", "pressure"}  # no preference result, no preference figure
    assert len(figs["dose_response"].axes) == 5
    for fig in figs.values():
        plt.close(fig)
    paths = save_steering_plots(result, tmp_path)
    assert {p.split("/")[-1] for p in paths.values()} == {"dose_response.png", "pressure.png"}
    assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in paths)
    assert json.loads(json.dumps(result.to_dict()))["hook"] == "blocks.1.hook_resid_post"


def test_the_page_says_how_the_sae_directions_chose_their_latents(tmp_path):
    meta = {"k": 16, "rank_by": "auroc", "select": "pursuit", "candidates": 256, "weighting": "lstsq",
            "concept_weight": 2.0}
    (tmp_path / "directions" / "sae").mkdir(parents=True)
    write_json(tmp_path / "directions" / "sae" / "directions.json", {"metadata": meta})
    assert sae_recipe(tmp_path) == (
        "SAE k=16: per emotion, among the 256 selective latents ranked best by auroc on the stories and 2 x on "
        "the sentences, the 16 chosen one at a time to rebuild the dense direction (sae_directions.recipe.select); "
        "weights by least squares onto the dense direction.")
    write_json(tmp_path / "directions" / "sae" / "directions.json",
               {"metadata": {**meta, "select": "rank", "weighting": "score", "concept_weight": 0.0}})
    assert sae_recipe(tmp_path) == "SAE k=16: per emotion, the top 16 selective latents by auroc; weights by effect size."
    write_json(tmp_path / "metrics.json", {"model": {"id": "tiny", "layer": 2}, "sae": {"k16": {"auroc": 0.75}}})
    assert "the top 16 selective latents by auroc" in build_report(tmp_path)
    assert sae_recipe(tmp_path / "nowhere") == ""
