"""End to end: `run_study` on a small slice of the shipped corpus with the shipped SAE."""

import json
import os
import re

import pytest
from conftest import SMALL_RUN_EMOTIONS as EMOTIONS
from conftest import broken_references, dtype_tolerance

from saefeatures.concepts import TEMPLATES
from saefeatures.corpus import load_corpus
from saefeatures.directions import EmotionDirections
from saefeatures.models import BF16_ENV, bf16_is_fast
from saefeatures.study.pipeline import run_study

pytestmark = pytest.mark.dtype  # activations and scoring run in the dtype 'auto' resolves to


def test_run_writes_manifest_metrics_report_and_directions(small_run):
    _, out, run = small_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == {"id": "smollm2-135m-instruct", "layer": 18}
    assert metrics["corpus"]["n_stories"] > 100 and metrics["corpus"]["n_emotions"] == len(EMOTIONS)
    for section in ("dense", "sae.k1", "sae.k4"):
        d = metrics
        for k in section.split("."):
            d = d[k]
        for key in ("valence_r", "arousal_r", "arousal_best_r", "top1", "top5", "auroc",
                    "emobank_valence_spearman", "emobank_arousal_spearman"):
            assert isinstance(d[key], float), (section, key)
    assert isinstance(metrics["sae"]["k4"]["cosine_to_dense_median"], float)
    for key in ("bow_top1", "bow_top5", "bow_auroc", "bow_cluster_acc"):
        assert 0.0 <= metrics["corpus"][key] <= 1.0, key
    for d in (metrics["dense"], metrics["sae"]["k1"]):
        assert 0.0 <= d["top1_display12"] <= 1.0 and d["cluster_acc"] >= d["top1"]
    for name in ("dense", "sae"):  # of the bench's emotions, the run knows proud and desperate
        reader = metrics["reader"][name]
        assert reader["n_emotions"] == 2.0 and reader["n"] == 6.0, reader
        assert all(isinstance(reader[k], float) for k in ("top1", "top3", "auroc"))
    assert json.loads((out / "figures" / "reader.json").read_text())["dense"]["skipped"][0] == "anxious"
    for key in ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered"):
        assert isinstance(metrics["sae"][key], float)
    for key in ("tylenol_afraid_spearman", "tylenol_calm_spearman", "tylenol_afraid_spearman_minus_control",
                "sae_tylenol_afraid_spearman", "sae_tylenol_calm_spearman_minus_control", "danger_tylenol_spearman",
                "danger_control_spearman"):
        assert -1.0 <= metrics["probes"][key] <= 1.0, key
    assert isinstance(metrics["steering"]["happy"]["judge_valence_spearman"], float)
    assert all(isinstance(v, float) for v in metrics["timings"].values()) and "total_s" in metrics["timings"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sha256"] and manifest["packages"]["transformer-lens"].startswith("3.")
    assert manifest["smoke"]["reply"]
    machine = manifest["machine"]
    auto = "bfloat16" if bf16_is_fast() else "float32"
    assert machine["dtypes"] == {"model": "float32", "activations": auto, "scoring": auto, "sae": "float32"}
    assert machine["bf16_switch"] == os.environ.get(BF16_ENV) and machine["bf16_is_fast"] == (auto == "bfloat16")
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list) and machine["torch_threads"] >= 1
    dense = EmotionDirections.load(out / "directions" / "dense")
    sae = EmotionDirections.load(out / "directions" / "sae")
    assert dense.layer == sae.layer == 18 and len(dense.names) == len(EMOTIONS)
    assert all(len(sae.latents[n]) <= 4 for n in sae.names) and dense.latents == {}
    # the default recipe adds each emotion's concept sentences, pooled once at every layer
    assert dense.metadata["concept_weight"] == 2.0 and dense.metadata["n_concept_emotions"] == len(EMOTIONS)
    assert dense.metadata["n_concepts"] == len(EMOTIONS) * len(TEMPLATES)
    assert manifest["stages"]["concept_activations"]["key"] and manifest["stages"]["concept_scoring"]["key"]
    assert sae.metadata["concept_weight"] == 2.0  # the SAE's latents are ranked on the sentences too
    assert list((out / "wandb").glob("offline-run-*"))
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["layer"] for row in sweep] == [12, 18]
    assert sweep[1]["valence_r"] == pytest.approx(metrics["dense"]["valence_r"])  # same recipe, same data
    assert isinstance(metrics["layer_sweep"]["L12"]["auroc"], float)


def test_report_has_every_section(small_run):
    _, out, _ = small_run
    html = (out / "report.html").read_text()
    for heading in ("Findings", "Timings", "Corpus", "Layer sweep", "Emotion directions: dense vs SAE-assembled",
                    "Detection: confusion matrices", "Feature cards", "Context probes", "Steering", "Monitor examples",
                    "SAE quality (held-out text)", "Reader test", "Emotions"):
        assert f"<h2>{heading}</h2>" in html, heading
    assert "data:image/png;base64," in html and "http://" not in html.replace("http://www.w3.org", "")
    dense = EmotionDirections.load(out / "directions" / "dense")
    assert (f"{dense.metadata['n_train']} train stories" in html  # how the dense directions were built
            and f"2 x the same direction of {dense.metadata['n_concepts']} short sentences" in html)
    h2 = [m.start() for m in re.finditer("<h2>", html)]
    assert html.index("<div id='findings'") < h2[0] < html.index("</div>", html.index("<div id='findings'"))  # first
    assert html.index("<h2>Timings</h2>") == h2[-1]  # the appendix, last
    assert broken_references(html, out) == []
    for emotion in EMOTIONS:
        assert f"id='emotion-{emotion}'" in html, emotion
    afraid = html.split("id='emotion-afraid'")[1].split("</details>")[0]
    assert "unsteered" in afraid and "dense at" in afraid  # steered continuations beside unsteered ones


def test_headline_numbers_carry_intervals_and_null_baselines(small_run):
    _, out, _ = small_run
    metrics = json.loads((out / "metrics.json").read_text())
    checked = []
    for section in ("dense", "sae.k1", "sae.k4", "probes", "steering.happy", "steering.afraid"):
        d = metrics
        for k in section.split("."):
            d = d[k]
        for key, ci in d["ci"].items():
            # a percentile interval need not hold its point estimate (bf16 can move it out), but an
            # interval of some other quantity would sit far from it
            width = ci["upper"] - ci["lower"]
            assert width >= 0 and ci["n_boot"] == 1000, (section, key, ci)
            assert ci["lower"] - width <= d[key] <= ci["upper"] + width, (section, key, ci, d[key])
            assert 0 <= d["null"][key]["percentile"] <= 100 and d["null"][key]["p05"] <= d["null"][key]["p95"]
            checked.append(f"{section}.{key}")
    for key in ("dense.valence_r", "dense.arousal_r", "dense.top1", "dense.cluster_acc", "dense.top1_display12",
                "probes.tylenol_afraid_spearman", "probes.sae_tylenol_calm_spearman_minus_control",
                "steering.happy.projection_change_at_max_fluent"):
        assert key in checked, key
    assert metrics["dense"]["null"]["valence_r"]["n_null"] == 1000
    assert metrics["probes"]["null"]["tylenol_afraid_spearman"]["n_null"] == 5040  # every order of 7 doses
    assert isinstance(metrics["dense"]["n_below_neutral"], float)


def test_detection_confusion_matrices(small_run):
    from saefeatures import emotions as emo
    from saefeatures.evals.detection import CLUSTER_NAMES

    _, out, _ = small_run
    metrics = json.loads((out / "metrics.json").read_text())
    for section in ("dense", "sae.k4"):
        det = json.loads((out / "figures" / section / "detection.json").read_text())
        clusters, display = det["confusion_clusters"], det["confusion_display"]
        assert clusters["labels"] == list(CLUSTER_NAMES) and display["labels"] == list(emo.DISPLAY)
        assert len(clusters["matrix"]) == 10 and all(len(r) == 10 for r in clusters["matrix"])
        assert len(display["matrix"]) == 12 and all(len(r) == 12 for r in display["matrix"])
        n = {e: int(d["n"]) for e, d in det["per_emotion"].items()}
        assert [sum(r) for r in clusters["matrix"]] == [sum(v for e, v in n.items() if emo.get(e).cluster == c)
                                                        for c in CLUSTER_NAMES]
        assert [sum(r) for r in display["matrix"]] == [n.get(e, 0) for e in emo.DISPLAY]
        value = metrics
        for k in section.split("."):
            value = value[k]
        diagonal = sum(clusters["matrix"][i][i] for i in range(10))
        assert diagonal / sum(n.values()) == pytest.approx(value["cluster_acc"])
        assert all("own_mean" in d and "neutral_mean" in d for d in det["per_emotion"].values())


def test_rerun_skips_finished_stages(small_run, model):
    cfg, out, _ = small_run
    before = json.loads((out / "manifest.json").read_text())["stages"]
    run = run_study(cfg, out, model=model)
    after = run.manifest["stages"]
    for stage in ("scoring", "steering", "output_scores", "corpus_audit"):
        assert after[stage] == before[stage], stage  # not recomputed: same key, same recorded time
    assert run.recomputed == []
    keyed = {name for name, entry in before.items() if entry.get("key")}
    assert set(run.skipped) == keyed and {"evals_dense", "feature_cards", "probes", "monitor", "report"} <= keyed
    assert run.manifest["last_run"]["recomputed"] == []


def test_rerun_recomputes_corrupt_artifacts_and_drops_old_sections(small_run, model, tmp_path, caplog):
    """On a copy of the run: a truncated directions shard and a cut-short JSON are named and
    recomputed; a steering emotion dropped from the config leaves metrics.json and the report."""
    import dataclasses
    import shutil

    cfg, out, _ = small_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / "directions" / "sae-k1" / "directions.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    detection = copy / "figures" / "dense" / "detection.json"
    detection.write_text(detection.read_text()[:50])
    cfg = dataclasses.replace(cfg, steering=dataclasses.replace(cfg.steering, emotions=["happy"]))
    run = run_study(cfg, copy, model=model)
    assert f"{shard} is corrupt" in caplog.text and f"{detection} is corrupt" in caplog.text
    assert {"directions_sae_k1", "evals_dense", "steering", "report"} <= set(run.recomputed)
    assert {"scoring", "activations", "directions_dense", "evals_sae_k1", "probes"} <= set(run.skipped)
    metrics = json.loads((copy / "metrics.json").read_text())
    assert "happy" in metrics["steering"] and "afraid" not in metrics["steering"]
    assert "afraid" in json.loads((out / "metrics.json").read_text())["steering"]
    steering_html = (copy / "report.html").read_text().split("<h2>Steering</h2>")[1].split("<h2>")[0]
    assert "happy" in steering_html and "afraid" not in steering_html
    assert EmotionDirections.load(copy / "directions" / "sae-k1").names == EmotionDirections.load(
        out / "directions" / "sae-k1").names


def test_card_snippets_are_the_peak_window_of_the_whole_record(small_run, model):
    """Cards show the windows the scoring pass kept: each snippet must be the window around the
    latent's peak over the whole record, as a fresh forward pass of that record gives it."""
    import torch

    from saefeatures.activations import forward_hooks, tokenize_texts
    from saefeatures.dtype_copies import with_dtype
    from saefeatures.sae import load_sae

    cfg, out, _ = small_run
    cards = json.loads((out / "figures" / "cards.json").read_text())
    sae = load_sae(cfg.sae, model, 18)
    dtype = json.loads((out / "manifest.json").read_text())["machine"]["dtypes"]["scoring"]
    scorer = with_dtype(model, dtype)  # the reference forward pass in the dtype the scoring pass ran in
    tol = dtype_tolerance(dtype, abs_float32=1e-3)
    by_id = {r.id: r for r in load_corpus(cfg.corpus.path)}
    checked = 0
    for card in cards[:4]:
        for snip in card["snippets"]:
            ids = tokenize_texts(model.tokenizer, [by_id[snip["record_id"]].text], 256)[0]
            with torch.no_grad():
                resid = forward_hooks(scorer, torch.tensor([ids]), [sae.cfg.metadata.hook_name])
                acts = sae.encode(resid[sae.cfg.metadata.hook_name].float())[0, :, card["latent"]]
            acts[0] = 0.0
            peak = int(acts.argmax())
            assert max(snip["acts"]) == pytest.approx(float(acts[peak]), **tol)
            lo = max(1, peak - 12)
            assert snip["acts"] == pytest.approx(acts[lo:lo + len(snip["acts"])].tolist(), **tol)
            assert "".join(snip["tokens"]) in model.tokenizer.decode(ids)
            checked += 1
    assert checked >= 4


def test_concept_scoring_pass_pools_the_concept_sentences(small_run, model, tmp_path, monkeypatch):
    """The concept sentences go through the model once: the SAE's scoring pass stores their pooled
    rows, and the concept activation stage reads them back, as a pass of its own would pool them."""
    import torch

    import saefeatures.activations as A
    from saefeatures.concepts import concept_sentences
    from saefeatures.study.pipeline import open_study
    from saefeatures.study.sae_stages import stage_concept_scores, stage_sae
    from saefeatures.study.stages import stage_concepts

    cfg, _, _ = small_run
    study = open_study(cfg, tmp_path / "run", model=model)
    try:
        stage_concept_scores(study, stage_sae(study))
        real, passes = A.forward_hooks, []
        monkeypatch.setattr(A, "forward_hooks", lambda *a, **kw: passes.append(1) or real(*a, **kw))
        acts, emotions = stage_concepts(study)
        assert passes == []  # every row came from the scoring pass
        monkeypatch.setattr(A, "forward_hooks", real)
        sentences = concept_sentences(sorted(EMOTIONS))
        assert emotions == [s.emotion for s in sentences] and acts.ids == [s.id for s in sentences]
        fresh = A.collect_pooled(model, sentences, cfg.activations, layers=study.layers, progress=False)
        for hook in fresh.acts:
            cos = torch.nn.functional.cosine_similarity(acts[hook], fresh[hook], dim=-1)
            assert cos.min() > 0.99, hook
    finally:
        study.run.close()
