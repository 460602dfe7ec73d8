"""The read-only commands on a finished run (`read`, `monitor`, `report`) leave every file of the run
as it was; `score` on a finished run leaves its record (manifest.json, metrics.json) byte-identical."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import dtype_tolerance

from saefeatures.directions import EmotionDirections
from saefeatures.study import cli, commands, pipeline, reading
from saefeatures.study.config import to_dict

pytestmark = pytest.mark.dtype  # the run pools in the dtype 'auto' resolves to

INVOICE = "Please find attached the invoice for March; payment is due within thirty days of receipt."
AFRAID = "I heard footsteps behind me in the dark alley and my heart was pounding with terror."


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def session_model(monkeypatch, model):
    """The commands load the session's model instead of a fresh copy."""
    for module in (reading, commands, pipeline):
        monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: model)
    return model


def test_read_is_calibrated_and_leaves_the_run_as_it_is(small_run, session_model, capsys):
    _, out, _ = small_run
    before = snapshot(out)
    cli.main(["read", INVOICE, AFRAID, "--run", str(out), "--json"])
    calibrated = json.loads(capsys.readouterr().out)
    cli.main(["read", INVOICE, AFRAID, "--run", str(out), "--json", "--raw"])
    raw = json.loads(capsys.readouterr().out)
    assert snapshot(out) == before
    assert calibrated["unit"] == "z vs neutral text" and raw["unit"] == "raw projection"
    assert calibrated["calibration"] == "neutral texts of the run's corpus, cut to each text's length"
    invoice, afraid = calibrated["texts"]
    assert set(invoice) == {"text", "dense", "sae"} and len(invoice["dense"]["top"]) == 3
    sae = EmotionDirections.load(out / "directions" / "sae")
    n = len(session_model.tokenizer(AFRAID, add_special_tokens=False).input_ids)
    mean, std = sae.length_calibration(session_model, reading.FinishedRun.open(out).neutral_texts(), n)
    i = sae.names.index("afraid")
    assert raw["texts"][1]["sae"]["scores"]["afraid"] == pytest.approx(
        afraid["sae"]["scores"]["afraid"] * float(std[i]) + float(mean[i]), abs=1e-2)
    # z-scores put one direction on one scale across texts: the afraid sentence reads 'afraid' far
    # above the invoice. (Which of ten emotions ranks first on a one-line text is not asserted: on
    # this ten-emotion run it moves between 'afraid', 'desperate' and 'excited' with the CPU's dtype.)
    assert afraid["sae"]["scores"]["afraid"] > invoice["sae"]["scores"]["afraid"] + 3
    cli.main(["read", INVOICE, "--run", str(out)])
    text = capsys.readouterr().out
    assert text.startswith(repr(INVOICE)) and "(z vs neutral text of its length)" in text and "  sae " in text


def test_read_calibrates_directions_saved_without_a_neutral_sample(small_run, session_model, tmp_path, capsys):
    """Directions of an older run (no neutral sample, no pooling record) read as the run pooled,
    calibrated on its corpus's neutral texts, still without writing into the run."""
    _, out, _ = small_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    for name in ("dense", "sae"):
        d = EmotionDirections.load(copy / "directions" / name)
        d.metadata.pop("pooling")
        EmotionDirections(d.names, d.layer, d.vectors, d.hook, d.recipe, d.center, d.latents, d.metadata).save(
            copy / "directions" / name)
    before = snapshot(copy)
    cli.main(["read", AFRAID, "--run", str(copy), "--json"])
    again = json.loads(capsys.readouterr().out)["texts"][0]
    cli.main(["read", AFRAID, "--run", str(out), "--json"])
    recorded = json.loads(capsys.readouterr().out)["texts"][0]
    assert snapshot(copy) == before
    dtype = json.loads((out / "manifest.json").read_text())["machine"]["dtypes"]["activations"]
    tolerance = dtype_tolerance(dtype, abs_float32=1e-2)  # the same neutral texts, pooled in other batches
    assert again["sae"]["scores"] == pytest.approx(recorded["sae"]["scores"], **tolerance)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["read", AFRAID, "--directions", str(copy / "directions" / "dense")])
    assert exit_.value.code == 2 and "no neutral sample" in capsys.readouterr().err


def test_read_without_the_runs_corpus_calibrates_on_the_directions_sample(small_run, session_model, tmp_path,
                                                                          capsys):
    """With the run's corpus gone, `read` z-scores against the neutral sample the directions keep."""
    _, out, _ = small_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["corpus"]["path"] = str(tmp_path / "gone.jsonl")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    cli.main(["read", AFRAID, "--run", str(copy), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["calibration"] == "the directions' neutral sample"
    sae = EmotionDirections.load(copy / "directions" / "sae")
    mean, std = sae.calibration()
    raw = torch.tensor([sae.read(session_model, [AFRAID], raw=True)[0][n] for n in sae.names])
    z = res["texts"][0]["sae"]["scores"]
    assert [z[n] for n in sae.names] == pytest.approx(((raw - mean) / std).tolist(), abs=1e-2)


def test_monitor_writes_a_token_trace_and_leaves_the_run_as_it_is(small_run, session_model, tmp_path, capsys):
    _, out, _ = small_run
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "I took 16000 mg of Tylenol and my hands are shaking."},
                                {"role": "assistant", "content": "Please call emergency services now."}]))
    before = snapshot(out)
    cli.main(["monitor", str(chat), "--run", str(out), "--out", str(tmp_path / "trace.html")])
    printed = json.loads(capsys.readouterr().out)
    assert snapshot(out) == before
    page = (tmp_path / "trace.html").read_text()
    assert "shaking" in page and "[system]" in page and "[assistant]" in page and "z vs neutral" in page
    assert page.count("data:image/png;base64,") == 1 and printed["tokens"] > 20
    assert [t["role"] for t in printed["turns"]] == ["user", "assistant"]
    with pytest.raises(SystemExit):
        cli.main(["monitor", str(chat), "--run", str(out), "--out", str(out / "trace.html")])
    assert "inside the run directory" in capsys.readouterr().err


def test_report_rebuilds_only_report_html(small_run, tmp_path, capsys):
    _, out, _ = small_run
    before = snapshot(out)
    cli.main(["report", str(out), "--out", str(tmp_path / "r.html")])
    assert snapshot(out) == before and "<h2>Timings</h2>" in (tmp_path / "r.html").read_text()
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    (copy / "report.html").unlink()
    before = snapshot(copy)
    cli.main(["report", str(copy)])
    after = snapshot(copy)
    assert "<h2>Timings</h2>" in after.pop("report.html").decode()
    assert after == before


def test_score_on_a_finished_run_leaves_its_record_byte_identical(small_run, session_model, tmp_path, capsys):
    cfg, out, _ = small_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    record = {name: (copy / name).read_bytes() for name in ("manifest.json", "metrics.json")}
    cli.main(["score", str(config), "--out", str(copy), "--emotions", "happy,afraid"])
    assert "top_latents" in json.loads(capsys.readouterr().out)
    assert {name: (copy / name).read_bytes() for name in record} == record
