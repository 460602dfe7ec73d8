"""The report's findings box (`report.findings`), confusion matrices and per-emotion sections
(`report.emotions`), on constructed metrics: rows, warnings that must and must not fire, and a page
whose box comes first and whose every image and link resolves."""

import pytest
from conftest import broken_references

from saefeatures.evals.dose_response import Curve, CurvePoint
from saefeatures.evals.steering_suite import SteeringResult
from saefeatures.files import write_json
from saefeatures.report.emotions import anchor, confusion_html, emotion_sections
from saefeatures.report.findings import Finding, findings_html, flags, headline
from saefeatures.report.page import build_report


def ci(lo, hi):
    return {"lower": lo, "upper": hi, "n_boot": 1000.0}


def null(pct, mean=0.1):
    return {"mean": mean, "p05": 0.0, "p95": 0.3, "percentile": pct, "n_null": 1000.0}


CLEAN = {
    "probes": {"speaker_afraid_user_distress": 2.0, "speaker_afraid_user_neutral": 0.5,
               "speaker_calm_user_distress": -1.0, "speaker_calm_user_neutral": 0.2,
               "local_afraid_story": 3.0, "local_afraid_request_alone": 0.1,
               "ci": {"tylenol_afraid_spearman": ci(-0.2, 0.9)}},
    "steering": {"happy": {"judge_valence_spearman": 0.9, "expected_valence_sign": 1.0,
                           "ci": {"projection_change_at_max_fluent": ci(0.5, 2.0),
                                  "valence_change_at_max_fluent": ci(0.1, 0.4)}},
                 "afraid": {"judge_valence_spearman": -0.8, "expected_valence_sign": -1.0,
                            "ci": {"projection_change_at_max_fluent": ci(-0.1, 1.0),  # crosses 0: no warning
                                   "valence_change_at_max_fluent": ci(-0.5, -0.1)}}},
}
DETECTION = {"dense": {"happy": {"auroc": 0.9, "top1": 0.5, "n": 4.0, "own_mean": 1.0, "neutral_mean": 0.2},
                       "sad": {"auroc": 0.7, "top1": 0.25, "n": 4.0, "own_mean": 0.4, "neutral_mean": 0.1}}}


def test_a_consistent_run_raises_no_warning():
    assert flags(CLEAN, DETECTION) == []
    assert flags({}, {}) == []


def test_each_contradiction_of_the_method_is_flagged():
    bad = {
        "probes": {"speaker_afraid_user_distress": 0.3, "speaker_afraid_user_neutral": 0.5,  # afraid: neutral > distress
                   "speaker_calm_user_distress": 0.9, "speaker_calm_user_neutral": 0.2,  # calm: distress > neutral
                   "local_afraid_story": 0.0, "local_afraid_request_alone": 0.1,
                   "ci": {"tylenol_afraid_spearman": ci(-0.9, -0.3), "sae_tylenol_afraid_spearman": ci(-0.5, 0.2)}},
        "steering": {"happy": {"expected_valence_sign": 1.0,
                               "ci": {"projection_change_at_max_fluent": ci(-2.0, -0.5),
                                      "valence_change_at_max_fluent": ci(-0.4, -0.1)}},
                     "afraid": {"expected_valence_sign": -1.0,
                                "ci": {"valence_change_at_max_fluent": ci(0.1, 0.3)}}},
    }
    detection = {"SAE k=4": {**DETECTION["dense"], "sad": {**DETECTION["dense"]["sad"], "own_mean": -0.3}}}
    warnings = flags(bad, detection)
    text = "\n".join(warnings)
    assert "SAE k=4: 1 of 2 directions read their own emotion's test stories below the neutral texts: sad (-0.30 vs 0.10)" in text
    assert "'afraid' reads higher on a neutral user turn (0.50) than on a distressed one (0.30)" in text
    assert "'calm' reads higher on a distressed user turn (0.90) than on a neutral one (0.20)" in text
    assert "'afraid' reads lower during the frightened story" in text
    assert "Tylenol probe (dense): 'afraid' falls" in text and "Tylenol probe (SAE)" not in text  # SAE's CI crosses 0
    assert "steering toward 'happy' lowers its own read-out" in text
    assert "steering toward 'happy' lowers the text's valence" in text
    assert "steering toward 'afraid' raises the text's valence" in text
    assert len(warnings) == 8


def test_many_emotions_below_neutral_are_counted_not_all_listed():
    per = {f"e{i}": {"auroc": 0.5, "top1": 0.0, "n": 1.0, "own_mean": -1.0, "neutral_mean": 0.0} for i in range(12)}
    (warning,) = flags({}, {"dense": per})
    assert warning.startswith("dense: 12 of 12") and warning.endswith("and 4 more.")


def test_headline_rows_carry_value_interval_null_and_paper():
    metrics = {"dense": {"valence_r": 0.7, "arousal_r": 0.1, "top1": 0.2,
                         "ci": {"valence_r": ci(0.6, 0.8), "top1": ci(0.1, 0.3)},
                         "null": {"valence_r": null(100.0), "arousal_r": null(40.0)}},
               "probes": {"tylenol_calm_spearman": -0.9, "null": {"tylenol_calm_spearman": null(2.0)}},
               "steering": {"desperate": {"judge_valence_spearman": -1.0, "expected_valence_sign": -1.0,
                                          "max_strength_ppl_ratio_under_2": 0.2, "valence_change_at_max_fluent": -0.3,
                                          "null": {"valence_change_at_max_fluent": null(1.0)}}}}
    rows = {r.measure: r for r in headline(metrics, [("dense", "dense")])}
    v = rows["valence r: PC1 vs human valence (dense)"]
    assert (v.value, v.paper, v.beyond_null) == (0.7, "0.81", True) and v.ci["lower"] == 0.6
    assert rows["arousal r: PC2 vs human arousal (dense)"].beyond_null is False
    assert rows["held-out detection, top-1 (dense)"].null is None and rows["held-out detection, top-1 (dense)"].beyond_null is None
    calm = rows["Tylenol: Spearman of dose vs 'calm' (dense)"]
    assert calm.expect == -1.0 and calm.beyond_null is True  # predicted to fall, and sits low in its null
    steer = rows["steering toward 'desperate' at 0.2 x norm: change in the text's Warriner valence"]
    assert "blackmail 22% → 72%" in steer.paper and steer.beyond_null is True
    assert not any("sae" in m.lower() for m in rows)  # no SAE section, no SAE rows
    html = findings_html(list(rows.values()), ["a <warning>"], ["a note"])
    assert html.startswith("<div id='findings'") and "&lt;warning&gt;" in html and "[0.60, 0.80]" in html
    assert "No result contradicts" in findings_html([], [])


def test_confusion_html_and_emotion_sections():
    conf = {"labels": ["a", "b"], "matrix": [[3, 1], [0, 2]]}
    html = confusion_html(conf, "caption")
    assert "<b>4</b>" in html and "<b>2</b>" in html and "rgba(40,160,60,0.75)" in html
    points = [CurvePoint(s, s, 5 + s, 4.0, 8, 10.0, 1 + s, 0.0, f"t{s}", [f"base-{s}-0", f"base-{s}-1"], [s, s])
              for s in (0.0, 0.2)]
    result = SteeringResult([Curve("happy", "dense", points)], None, None, 3.0, "h", prompts=["P <1>", "P2"])
    latents = {"happy": [[12, 0.5], [7, 0.25]]}
    out = emotion_sections(["happy", "sad", "at ease"], DETECTION, latents, result, linked={12})
    assert f"id='{anchor('happy')}'" in out and "id='emotion-sad'" in out and anchor("at ease") == "emotion-at-ease"
    assert "<a href='#latent-12'>12 (0.50)</a>" in out and "7 (0.25)" in out and "#latent-7" not in out
    assert "P &lt;1&gt;" in out and "base-0.0-0" in out and "base-0.2-0" in out and "dense at 0.2 x norm" in out
    assert "emotion-at-ease" not in out  # nothing known about it: no section


def test_page_opens_with_findings_and_every_reference_resolves(tmp_path):
    metrics = {"model": {"id": "tiny", "layer": 2}, "timings": {"scoring_s": 1.0},
               "dense": {"valence_r": 0.5, "top1": 0.25, "ci": {"valence_r": ci(0.3, 0.7)}}, **CLEAN}
    write_json(tmp_path / "metrics.json", metrics)
    write_json(tmp_path / "manifest.json", {"started": "today"})
    dense = tmp_path / "figures" / "dense"
    dense.mkdir(parents=True)
    write_json(dense / "detection.json", {"per_emotion": DETECTION["dense"],
                                          "confusion_clusters": {"labels": ["x", "y"], "matrix": [[1, 0], [1, 1]]}})
    (dense / "geometry.png").write_bytes(b"\x89PNG fake")
    (dense / "geometry.html").write_text("<html></html>")
    page = build_report(tmp_path)
    assert page.index("id='findings'") < page.index("<h2>") + 40 and "alt='findings: each headline number" in page and page.index("<h2>Findings</h2>") == page.index("<h2>")
    assert page.index("<h2>Timings</h2>") > page.index("<h2>Emotions</h2>")  # timings are the appendix, last
    assert "href='figures/dense/geometry.html'" in page and "Detection: confusion matrices" in page
    assert broken_references(page, tmp_path) == []
    (dense / "geometry.html").unlink()
    assert broken_references(page, tmp_path) == ["figures/dense/geometry.html"]  # the check can fail
    assert "geometry.html" not in build_report(tmp_path)  # and the page links only what exists


def test_findings_value_keeps_its_sign():
    f = Finding("m", -0.4, None, {"mean": 0, "p05": -0.3, "p95": 0.3, "percentile": 3.0}, "k", "–", expect=-1.0)
    assert f.beyond_null is True and Finding("m", None, None, None, "k", "–").beyond_null is None


def test_findings_figure_draws_a_panel_per_result_and_the_page_inlines_it(tmp_path):
    import base64

    import matplotlib.pyplot as plt

    from saefeatures.report.findings_figure import BEYOND, WITHIN, findings_figure, findings_png

    metrics = {"dense": {"valence_r": 0.7, "arousal_r": 0.1, "top1": 0.2,
                         "ci": {"valence_r": ci(0.6, 0.8)},
                         "null": {"valence_r": null(100.0), "arousal_r": null(40.0)}},
               "probes": {"tylenol_afraid_spearman": 0.5, "null": {"tylenol_afraid_spearman": null(50.0)}}}
    rows = headline(metrics, [("dense", "dense")])
    assert [r.group for r in rows] == ["geometry vs human ratings"] * 2 + ["held-out detection", "Tylenol probe"]
    fig = findings_figure(rows, "Findings: tiny, layer 2")
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["geometry vs human ratings", "held-out detection", "Tylenol probe"]
    geometry = fig.axes[0]
    dots = [(line.get_xdata()[0], line.get_color()) for line in geometry.lines if line.get_marker() == "o"]
    assert dots == [(0.7, BEYOND), (0.1, WITHIN)]  # the value, coloured by where it sits in its null
    assert [line.get_xdata()[0] for line in geometry.lines if line.get_marker() == "*"] == [0.81, 0.66]  # paper
    assert [t.get_text() for t in geometry.get_yticklabels()] == ["valence r: PC1 vs human valence (dense)",
                                                                   "arousal r: PC2 vs human arousal (dense)"]
    plt.close(fig)
    png = findings_png(rows)
    assert png.startswith(b"\x89PNG")
    html = findings_html(rows, [], figure_png=png)
    assert html.index("<img") < html.index("<table>") and base64.b64encode(png).decode() in html
    with pytest.raises(ValueError, match="no headline numbers"):
        findings_figure([])
