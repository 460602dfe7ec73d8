"""wandb logging (`study.tracking`), offline: steering curves as line plots over strength and
tables, the continuations as a table, the detection, confusion and findings tables of a run."""

from saefeatures.evals.dose_response import Curve, CurvePoint
from saefeatures.evals.steering_suite import SteeringResult
from saefeatures.files import write_json
from saefeatures.study.config import TrackingConfig
from saefeatures.study.tracking import Tracker, detection_tables, log_steering_wandb, report_tables, steering_panels


def _result():
    def curve(method, texts):
        return Curve("happy", method, [CurvePoint(s, s, 5 + s, 4.0, 8, 10.0, 1 + s, 0.0, texts[0], texts, [s, s])
                                       for s in (0.0, 0.1, 0.2)])
    return SteeringResult([curve("dense", ["a happy day", "a sunny walk"]), curve("sae", ["ok", "fine"])], None, None,
                          norm=3.0, hook="blocks.1.hook_resid_post", prompts=["P1", "P2"])


def test_steering_panels_plot_each_measure_over_strength():
    import wandb

    panels = steering_panels(wandb, _result())
    curves, generations = panels["steering/curves"], panels["steering/generations"]
    assert len(curves.data) == 6 and len(generations.data) == 12  # 2 methods x 3 strengths, x 2 continuations
    assert generations.data[1][:5] == ["happy", "dense", 0.0, "P2", "a sunny walk"]
    lines = {k for k in panels if k.startswith("steering/happy/")}
    assert lines == {f"steering/happy/{m}" for m in ("projection", "valence", "arousal", "ppl_ratio", "repetition")}
    chart = panels["steering/happy/valence"]
    assert isinstance(chart, wandb.plot.CustomChart) and chart.table.columns == ["step", "lineKey", "lineVal"]
    assert {row[1] for row in chart.table.data} == {"dense", "sae"} and len(chart.table.data) == 6


def test_a_run_logs_detection_findings_and_steering_tables_offline(tmp_path):
    run = tmp_path / "run"
    det = run / "figures" / "dense"
    det.mkdir(parents=True)
    write_json(det / "detection.json", {
        "per_emotion": {"happy": {"auroc": 0.9, "top1": 0.5, "n": 4.0, "own_mean": 1.0, "neutral_mean": 0.1}},
        "confusion_clusters": {"labels": ["x", "y"], "matrix": [[2, 1], [0, 3]]}})
    tables = detection_tables(run)
    assert tables["detection/dense/confusion_clusters"] == (["true", "x", "y", "records"], [["x", 2, 1, 3], ["y", 0, 3, 3]])
    assert tables["detection/dense/per_emotion"][1] == [["happy", 0.9, 0.5, 4.0, 1.0, 0.1]]
    metrics = {"dense": {"valence_r": 0.6, "ci": {"valence_r": {"lower": 0.5, "upper": 0.7}},
                         "null": {"valence_r": {"mean": 0.1, "p05": 0.0, "p95": 0.2, "percentile": 99.0}}}}
    logged = report_tables(run, metrics, {})
    columns, rows = logged["findings"]
    assert rows[0][:4] == ["valence r: PC1 vs human valence (dense)", 0.6, 0.5, 0.7] and columns[0] == "measure"
    with Tracker(TrackingConfig(mode="offline"), run, name="t") as tracker:
        tracker.log_tables(logged)
        log_steering_wandb(_result(), {}, run_dir=run)  # logs into the open run
    tables = [p.as_posix().split("/media/table/")[1] for p in (run / "wandb").rglob("*.table.json")]
    for logged_as in ("findings_", "detection/dense/confusion_clusters_", "detection/dense/per_emotion_",
                      "steering/curves_", "steering/generations_", "steering/happy/valence_table_"):
        assert any(t.startswith(logged_as) for t in tables), (logged_as, tables)
