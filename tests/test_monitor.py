import json

import pytest
import torch

from saefeatures.directions import EmotionDirections
from saefeatures.errors import UserError
from saefeatures.monitor import (Calibration, LiveMonitor, Trace, alarms, calibrate, load_chat, load_transcript,
                                 trace_chat, trace_text)
from saefeatures.report.monitor import token_label, trace_figure, trace_html, trace_page

NEUTRAL = ["The library opens at nine and closes at six on weekdays, and on Saturdays it opens at ten.",
           "To boil an egg, place it in boiling water for eight minutes, then cool it under cold water.",
           "The train to the airport leaves every twenty minutes from platform three.",
           "A standard sheet of A4 paper measures 210 by 297 millimetres."]


@pytest.fixture(scope="module")
def dirs():
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(3, 576, generator=g), dim=1)
    return EmotionDirections(["afraid", "calm", "desperate"], 12, v)


def test_chat_trace_aligns_tokens_text_and_turns(model, dirs):
    chat = [{"role": "user", "content": "My hands are shaking."}, {"role": "assistant", "content": "Breathe slowly."}]
    trace = trace_chat(model, dirs, chat)
    assert "".join(trace.tokens) == model.tokenizer.apply_chat_template(chat, tokenize=False)
    user = "".join(t for t, r, c in zip(trace.tokens, trace.roles, trace.content) if r == "user" and c)
    reply = "".join(t for t, turn, c in zip(trace.tokens, trace.turns, trace.content) if turn == 1 and c)
    assert user.strip() == "My hands are shaking." and reply.strip() == "Breathe slowly."
    assert trace.projections.shape == (len(trace.tokens), 3) and torch.isnan(trace.projections[0]).all()
    assert [m["role"] for m in trace.turn_means()] == ["user", "assistant"]


def test_projection_equals_direction_dot_residual(model, dirs):
    trace = trace_text(model, dirs, NEUTRAL[0])
    ids = torch.tensor([trace.token_ids])
    _, cache = model.run_with_cache(ids, names_filter=dirs.hook)
    ref = cache[dirs.hook][0] @ dirs.vectors.T
    torch.testing.assert_close(trace.projections[1:], ref[1:], atol=1e-3, rtol=1e-4)


def test_alarm_fires_on_a_planted_spike_and_not_on_neutral_text(model, dirs):
    calib = calibrate(model, dirs, NEUTRAL[:3])
    trace = trace_text(model, dirs, NEUTRAL[3])
    assert alarms(trace, calib, ["afraid", "calm"], threshold=4.0) == []
    j = trace.names.index("afraid")
    spiked = trace.projections.clone()
    spiked[10:14, j] = calib.mean[j] + 12 * calib.std[j]
    planted = Trace(trace.tokens, trace.token_ids, trace.roles, trace.turns, trace.content, trace.names, spiked)
    fired = alarms(planted, calib, ["afraid", "calm"], threshold=4.0, window=4)
    assert [a.emotion for a in fired] == ["afraid"]
    assert 10 <= fired[0].start <= 13 and fired[0].peak_z > 4.0


def test_calibration_roundtrip(model, dirs, tmp_path):
    calib = calibrate(model, dirs, NEUTRAL)
    calib.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    torch.testing.assert_close(back.std, calib.std)
    assert back.n_tokens == calib.n_tokens > 40


def test_live_monitor_records_during_generation(model, dirs):
    from saefeatures.models import hf_twin

    prompt = model.tokenizer(NEUTRAL[2], return_tensors="pt", add_special_tokens=False)
    with LiveMonitor(model, dirs) as live:
        out = hf_twin(model).generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    live_proj = live.projections(0)
    assert live_proj.shape[0] == out.shape[1] - 1  # the last token is produced, never fed back
    full = trace_text(model, dirs, model.tokenizer.decode(out[0]))
    if full.token_ids == out[0].tolist():
        torch.testing.assert_close(live_proj[1:], full.projections[1:-1], atol=2e-3, rtol=1e-3)
    assert len(live.steps) == 6  # one prompt pass + one per generated token fed back


def test_transcript_errors_name_the_line(tmp_path):
    good = {"role": "user", "content": "hi"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"role": "robot", "content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2: malformed message .*role must be one of"):
        load_transcript(path)
    path.write_text(json.dumps(good) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"t.jsonl:3: malformed message"):
        load_transcript(path)
    path.write_text(json.dumps({"role": "user"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: .*exactly 'role' and 'content'"):
        load_transcript(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_transcript(path) == [good]


def test_rendering(model, dirs):
    chat = [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Yes."}]
    trace = trace_chat(model, dirs, chat)
    html = trace_html(trace, "afraid")
    assert html.count("<span") == len(trace.tokens) and "[assistant]" in html
    fig = trace_figure(trace, ["afraid", "calm"])
    assert [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")] == ["afraid", "calm"]


def test_the_templates_own_system_turn_is_labelled_system(model, dirs):
    """SmolLM2's template adds a default system prompt to a chat without one: its tokens are the
    system's, not the first user message's."""
    chat = [{"role": "user", "content": "Is it safe?"}]
    trace = trace_chat(model, dirs, chat)
    system = "".join(t for t, r in zip(trace.tokens, trace.roles) if r == "system")
    user = "".join(t for t, r in zip(trace.tokens, trace.roles) if r == "user")
    assert "You are a helpful AI assistant" in system and "Is it safe?" not in system
    assert user.startswith("<|im_start|>user") and "Is it safe?" in user
    html = trace_html(trace, "afraid")
    assert html.index("[system]") < html.index("[user]")
    own = trace_chat(model, dirs, [{"role": "system", "content": "Be brief."}, *chat])
    assert -1 not in own.turns and own.roles[0] == "system"


def test_trace_figure_and_page_show_the_tokens(model, dirs, tmp_path):
    chat = [{"role": "user", "content": "My hands are shaking."}, {"role": "assistant", "content": "Breathe."}]
    trace = trace_chat(model, dirs, chat)
    fig = trace_figure(trace, ["afraid"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [token_label(t) for t in trace.tokens] and "shaking" in "".join(labels)
    page = trace_page(trace, ["afraid", "calm"], title="t")
    assert page.count("data:image/png;base64,") == 1 and page.count("<span") == 2 * len(trace.tokens)


def test_chat_files(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat))
    assert load_chat(path) == chat
    path.write_text(json.dumps([{"role": "robot", "content": "x"}]))
    with pytest.raises(UserError, match=r"chat.json\[0\]: role must be one of"):
        load_chat(path)
    path.write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_chat(path)
