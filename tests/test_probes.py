"""Context probes on the real model: several direction sets read from one pass, the model's own
danger judgment, and the flattening into metrics.json keys."""

import numpy as np
import pytest
import torch

from saefeatures.directions import EmotionDirections
from saefeatures.evals.probes import (CONTROL_DRUG, DANGER_QUESTION, ProbeConfig, danger, probe_metrics, tylenol,
                                      tylenol_sets)
from saefeatures.report.probes import tylenol_figure
from saefeatures.models import chat_prompt
from saefeatures.monitor import trace_chat, trace_chat_sets

CFG = ProbeConfig(doses=[250, 4000, 16000])


def _dirs(seed: int, layer: int = 12) -> EmotionDirections:
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(2, 576, generator=g), dim=1)
    return EmotionDirections(["afraid", "calm"], layer, v, center=torch.randn(576, generator=g))


def test_sets_read_from_one_pass_equal_separate_reads(model):
    a, b = _dirs(0), _dirs(1)
    chat = [{"role": "user", "content": "I took 8000 mg of Tylenol. Should I take more?"}]
    together = trace_chat_sets(model, [a, b], chat, add_generation_prompt=True)
    for dirs, trace in zip((a, b), together):
        alone = trace_chat(model, dirs, chat, add_generation_prompt=True)
        torch.testing.assert_close(trace.projections[1:], alone.projections[1:])
        assert trace.tokens == alone.tokens and trace.turns == alone.turns
    assert tylenol_sets(model, [a, b], CFG)[1] == tylenol(model, b, CFG)
    with pytest.raises(ValueError, match="share one hook"):
        trace_chat_sets(model, [a, _dirs(2, layer=6)], chat)


def test_danger_is_the_models_yes_vs_no_answer(model):
    res = danger(model, CFG)
    assert len(res["tylenol_p_yes"]) == len(res["control_p_yes"]) == 3
    tok = model.tokenizer
    text = chat_prompt(tok, [{"role": "user", "content": DANGER_QUESTION.format(dose=4000, drug=CONTROL_DRUG)}])
    with torch.no_grad():
        logits = model(tok(text, add_special_tokens=False, return_tensors="pt").input_ids)[0, -1]
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in (" Yes", " No"))
    yes2, no2 = (tok(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    p = logits.softmax(-1)
    p_yes = (p[yes] + p[yes2]) / (p[yes] + p[yes2] + p[no] + p[no2])
    assert res["control_p_yes"][1] == pytest.approx(float(p_yes), abs=1e-4)
    assert all(0 < v < 1 for v in res["tylenol_p_yes"] + res["control_p_yes"])
    assert -1 <= res["tylenol_spearman"] <= 1


def test_metric_keys_and_figure():
    tyl = {"tylenol_afraid_spearman": 0.5, "user_turn": [[0.0]]}
    results = {"tylenol": tyl, "sae_tylenol": tyl, "danger": {"tylenol_spearman": -0.4, "doses": [1]},
               "local": {"afraid_story": 1.0}}
    assert probe_metrics(results) == {"tylenol_afraid_spearman": 0.5, "sae_tylenol_afraid_spearman": 0.5,
                                      "danger_tylenol_spearman": -0.4, "local_afraid_story": 1.0}
    doses = [250, 4000, 16000]
    res = {"doses": doses, "emotions": ["afraid"], "user_turn": np.zeros((3, 1)).tolist(),
           "assistant_header": np.ones((3, 1)).tolist(), "control_user_turn": np.ones((3, 1)).tolist()}
    fig = tylenol_figure(res, {"doses": doses, "tylenol_p_yes": [0.2, 0.5, 0.9], "control_p_yes": [0.1] * 3})
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "P(Yes)"


def test_dose_intervals_over_phrasings_and_exact_null():
    from saefeatures.evals.probes import dose_uncertainty

    doses = [250, 500, 1000, 2000, 4000, 8000, 16000]
    rising = np.arange(7.0)[:, None] + np.array([0.0, 0.5, -0.5, 0.2])  # every phrasing rises with the dose
    ci, null = dose_uncertainty(doses, rising)
    assert ci["lower"] == ci["upper"] == pytest.approx(1.0)
    assert null["n_null"] == 5040 and null["percentile"] == pytest.approx(100 - 50 / 5040) and null["mean"] == pytest.approx(0)
    mixed = np.stack([np.arange(7.0), -np.arange(7.0), np.arange(7.0), np.zeros(7)], axis=1)
    ci, _ = dose_uncertainty(doses, mixed)
    assert ci["lower"] < 0 < ci["upper"]  # phrasings disagree: the interval spans zero
    results = {"tylenol": {"tylenol_afraid_spearman": 1.0, "ci": {"tylenol_afraid_spearman": {"lower": 0.5}}},
               "sae_tylenol": {"null": {"tylenol_afraid_spearman": {"p95": 0.7}}}}
    assert probe_metrics(results) == {"tylenol_afraid_spearman": 1.0, "ci": {"tylenol_afraid_spearman": {"lower": 0.5}},
                                      "null": {"sae_tylenol_afraid_spearman": {"p95": 0.7}}}
