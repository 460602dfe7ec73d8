"""The latent table (`latents`, `feature_cards.build_latent_table`), its report browser, its wandb
table and artifacts, and the read-only CLI (`saefeatures latents`, `saefeatures latent`): on the
stand-in Llama with a random SAE, then on the finished small run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN_EMOTIONS, STANDIN_RECORDS as RECORDS, broken_references, make_random_sae

from saefeatures.activations import ActivationConfig
from saefeatures.directions import EmotionDirections
from saefeatures.errors import UserError
from saefeatures.feature_cards import build_latent_table
from saefeatures.latents import SORT_KEYS, WANDB_COLUMNS, LatentTable
from saefeatures.report.latents import latents_html
from saefeatures.sae.scoring import LatentScores, ScoringConfig, score_latents
from saefeatures.study import cli
from saefeatures.study.config import TrackingConfig
from saefeatures.study.tracking import Tracker, file_artifact, typed_table

SELECTED = {"afraid": [(3, 0.2), (7, 0.9)], "happy": [(7, 0.4), (11, 0.6)]}


@pytest.fixture(scope="module")
def built(tiny_model):
    sae = make_random_sae(d_in=64, d_sae=24, hook="blocks.1.hook_resid_post", seed=1, k=4)
    scores = score_latents(tiny_model, sae, RECORDS, ScoringConfig(warmup_records=6, window=6),
                           ActivationConfig(dtype="float32"))
    dirs = EmotionDirections(["afraid", "happy"], 1, torch.nn.functional.normalize(torch.randn(2, 64), dim=1),
                             recipe="sae-k2", latents=SELECTED)
    return scores, build_latent_table(tiny_model, sae, scores, dirs, RECORDS, snippets=2)


@pytest.fixture
def run_dir(built, tmp_path):
    built[1].save(tmp_path)
    return tmp_path


def test_one_row_per_scored_latent_with_its_scores(built):
    scores, table = built
    emotions = [c for c in scores.classes if c != "neutral"]
    assert table.emotions == emotions and [r.latent for r in table.rows] == list(range(scores.n_latents))
    auroc, d = scores.auroc(), scores.cohens_d()
    density = scores.fire.sum(0) / scores.tokens.sum()
    for r in table.rows:
        c = scores.index(r.emotion)
        assert r.auroc == pytest.approx(float(auroc[c, r.latent])) and r.cohens_d == pytest.approx(float(d[c, r.latent]))
        assert r.density == pytest.approx(float(density[r.latent]))
        assert len(r.logit_lens) == 10 and len(r.top_emotions) == 5
        assert r.top_emotions[0][1] >= r.top_emotions[-1][1]
        top = float(scores.max[:, r.latent].max())
        if top > 0:  # the first snippet holds the latent's highest activation over the corpus
            assert 1 <= len(r.snippets) <= 2 and max(r.snippets[0].acts) == pytest.approx(top, abs=1e-3)
        else:
            assert r.snippets == []
    # selection and weight from the directions; the row's emotion is the one it weighs most in
    assert table.rows[7].selected == {"afraid": 0.9, "happy": 0.4} and table.rows[7].emotion == "afraid"
    assert table.rows[11].selected == {"happy": 0.6} and table.rows[11].weight == 0.6
    unselected = [r for r in table.rows if not r.selected]
    assert len(unselected) == scores.n_latents - 3 and all(r.weight == 0.0 for r in unselected)
    for r in unselected:  # else its best emotion by AUROC
        assert r.auroc == pytest.approx(float(max(auroc[scores.index(n), r.latent] for n in emotions)))


def test_the_table_round_trips_and_sorts(built, run_dir):
    _, table = built
    loaded = LatentTable.load(run_dir)
    assert loaded.rows == table.rows and loaded.emotions == table.emotions
    assert torch.allclose(torch.from_numpy(loaded.auroc), table.auroc.float())
    assert torch.allclose(torch.from_numpy(loaded.cohens_d), table.cohens_d.float())
    for sort, field in SORT_KEYS.items():
        rows = loaded.for_emotion("happy", sort=sort)
        assert len(rows) == len(table.rows)
        values = [r[field] for r in rows]
        assert values == sorted(values, reverse=True), sort
    assert [r["latent"] for r in loaded.for_emotion("happy", sort="weight", top=2)] == [11, 7]
    e = loaded.emotions.index("sad")
    assert loaded.for_emotion("sad", top=1)[0]["auroc"] == pytest.approx(float(loaded.auroc[e].max()))
    assert set(loaded.emotion_scores(7)) >= {"afraid", "happy"}


def test_bad_names_and_ids_are_user_errors(run_dir):
    table = LatentTable.load(run_dir)
    with pytest.raises(UserError, match="'proud' was not scored in this run; scored: afraid"):
        table.for_emotion("proud")
    with pytest.raises(UserError, match="Unknown emotion 'afriad'. Did you mean: afraid"):
        table.for_emotion("afriad")
    with pytest.raises(UserError, match="latent 24 is not in this run's SAE: ids are 0 to 23"):
        table.row(24)
    with pytest.raises(UserError, match="unknown sort"):
        table.for_emotion("happy", sort="max")
    with pytest.raises(UserError, match=r"latents.json is missing: this run has no latent table"):
        LatentTable.load(run_dir / "scores")


def _column_kind(table, column: str) -> str:
    return json.dumps(table._column_types.params["type_map"][column].to_json())


def test_one_typed_wandb_table_and_artifacts(built, run_dir, tmp_path):
    _, table = built
    columns, rows, types = table.flat()
    wb = typed_table(columns, rows, types)
    assert len(wb.data) == len(table.rows) and wb.columns == [c for c, _ in WANDB_COLUMNS]
    for column, kind in WANDB_COLUMNS:
        assert ('"number"' if kind in (int, float) else '"string"') in _column_kind(wb, column), column
    assert wb.data[7][:3] == [7, "afraid", 0.9] and wb.data[7][3] == "afraid:0.900, happy:0.400"
    with pytest.raises(TypeError):  # a number as a string is refused, not logged as text
        typed_table(columns, [[str(v) for v in rows[0]]], types)
    art = file_artifact("latents", "table", run_dir / "scores")
    assert sorted(art.manifest.entries) == ["latents.json", "latents.safetensors"]
    with Tracker(TrackingConfig(mode="offline"), tmp_path / "wb", name="test") as tracker:
        tracker.log_table("latents", *table.flat())
        tracker.log_artifact("directions", "directions", run_dir / "scores", {"layer": 1})
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_the_browser_has_a_row_per_latent_and_links_to_cards(built):
    _, table = built
    page = latents_html(table, {7: "card-7-afraid"})
    assert page.count("<tr id='latent-") == len(table.rows)
    assert "<a href='#card-7-afraid'>7</a>" in page and "<script>" in page and "http" not in page
    assert broken_references(page + "<div id='card-7-afraid'></div>", Path(".")) == []
    assert broken_references(page, Path(".")) == ["#card-7-afraid"]  # the check finds a link to nothing


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_commands_print_and_change_nothing(run_dir, capsys):
    before = hashes(run_dir)
    cli.main(["latents", "happy", "--run", str(run_dir), "--sort", "weight", "--top", "3", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["latent"] for r in rows[:2]] == [11, 7] and len(rows) == 3
    cli.main(["latents", "afraid", "--run", str(run_dir)])
    text = capsys.readouterr().out
    assert text.startswith("20 latents for afraid") and "density" in text
    cli.main(["latent", "7", "--run", str(run_dir)])
    text = capsys.readouterr().out
    assert "selected for: afraid (weight 0.900), happy (weight 0.400)" in text and "logit lens:" in text
    cli.main(["latent", "7", "--run", str(run_dir), "--json"])
    card = json.loads(capsys.readouterr().out)
    assert card["latent"] == 7 and card["weight"] == 0.9 and "afraid" in card["emotion_scores"]
    assert hashes(run_dir) == before


@pytest.mark.parametrize("argv, message", [
    (["latents", "afriad"], "Unknown emotion 'afriad'"),
    (["latents", "proud"], "'proud' was not scored"),
    (["latents", "happy", "--top", "0"], "--top 0"),
    (["latent", "99"], "latent 99 is not in this run's SAE"),
    (["latent", "1", "--run", "/nonexistent/run"], "/nonexistent/run is not a run directory"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, argv, message):
    argv = argv if "--run" in argv else [*argv, "--run", str(run_dir)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def test_a_run_without_a_table_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["latent", "1", "--run", str(tmp_path)])
    assert exit_.value.code == 2 and "latents.json is missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the finished small run


@pytest.mark.dtype
def test_the_small_runs_table_has_every_scored_latent(small_run):
    _, out, _ = small_run
    scores = LatentScores.load(out / "scores")
    table = LatentTable.load(out)
    assert len(table.rows) == scores.n_latents and table.emotions == [e for e in scores.classes if e != "neutral"]
    assert set(table.emotions) == set(SMALL_RUN_EMOTIONS)
    sae = EmotionDirections.load(out / "directions" / "sae")
    for name in sae.names:
        for latent, weight in sae.latents[name]:
            assert table.rows[latent].selected[name] == pytest.approx(weight)
    active = [r for r in table.rows if r.density > 0]
    assert active and all(r.snippets and r.logit_lens for r in active)
    rows = table.for_emotion("afraid", sort="d")
    assert len(rows) == scores.n_latents and rows[0]["cohens_d"] == pytest.approx(
        float(scores.cohens_d()[scores.index("afraid")].max()), rel=1e-5)


@pytest.mark.dtype
def test_the_small_run_browses_read_only(small_run, capsys):
    _, out, _ = small_run
    before = hashes(out)
    cli.main(["latents", "afraid", "--run", str(out), "--sort", "auroc", "--top", "5"])
    assert capsys.readouterr().out.startswith("5 latents for afraid")
    cli.main(["latents", "calm", "--run", str(out), "--json"])
    latent = json.loads(capsys.readouterr().out)[0]["latent"]
    cli.main(["latent", str(latent), "--run", str(out)])
    assert "top snippets" in capsys.readouterr().out
    cli.main(["latent", str(latent), "--run", str(out), "--json"])
    assert json.loads(capsys.readouterr().out)["latent"] == latent
    assert hashes(out) == before


@pytest.mark.dtype
def test_the_small_runs_report_browses_every_latent(small_run):
    _, out, _ = small_run
    page = (out / "report.html").read_text()
    assert "<h2>Latent browser</h2>" in page
    assert page.count("<tr id='latent-") == len(LatentTable.load(out).rows)
    assert broken_references(page, out) == []
    cards = json.loads((out / "figures" / "cards.json").read_text())
    assert all(f"href='#card-{c['latent']}-" in page for c in cards)
