"""scripts/readme_tables.py: README's results tables regenerated between their markers from a run."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(readme_tables)

MACHINE = {"cpu": "AMD EPYC 7B13", "cpu_flags": ["avx2"], "cpu_count": 2, "torch_threads": 2,
           "dtypes": {"model": "float32", "activations": "float32"}}


def _regenerate(run: Path, tmp_path: Path) -> tuple[str, str]:
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    figure = tmp_path / "findings.png"
    assert readme_tables.main([str(run), "--readme", str(readme), "--figure", str(figure)]) == 0
    first = readme.read_text()
    assert figure.read_bytes().startswith(b"\x89PNG")  # the hero image, drawn from the run
    assert readme_tables.main([str(run), "--readme", str(readme), "--figure", str(figure)]) == 0
    assert readme.read_text() == first  # idempotent
    return (ROOT / "README.md").read_text(), first


def _outside(text: str) -> str:
    for name in readme_tables.BLOCKS:
        head, rest = text.split(f"<!-- readme_tables:{name} -->")
        text = head + "@@" + rest.split(f"<!-- /readme_tables:{name} -->")[1]
    return text


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- readme_tables:{name} -->\n")[1].split(f"\n<!-- /readme_tables:{name} -->")[0]


def test_tables_replace_only_the_marked_blocks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"model": {"layer": 20},
               "dense": {"top1": 0.25, "valence_r": 0.5, "ci": {"valence_r": {"lower": 0.4, "upper": 0.6}}},
               "sae": {"k16": {"top1": 0.125, "cosine_to_dense_median": 0.375}, "l0": 32.0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "manifest.json").write_text(json.dumps({"machine": MACHINE, "config": {"sae_directions": {"main_k": 16}}}))
    before, after = _regenerate(run, tmp_path)
    assert _outside(after) == _outside(before)
    directions = _block(after, "directions").splitlines()
    assert directions[0].startswith("| directions (layer 20, test split) | top-1 |")
    assert directions[2].startswith("| dense (DiffMean) | 0.250 |") and "| 0.500 |" in directions[2]
    assert directions[3].startswith("| SAE, k = 16 | 0.125 |") and directions[3].endswith("| 0.375 |")
    machine = directions[-1]
    assert "AMD EPYC 7B13 (avx2; 2 cores)" in machine and "torch threads 2" in machine and "activations float32" in machine
    findings = _block(after, "findings")
    assert "| valence r: PC1 vs human valence (dense) | 0.500 | [0.40, 0.60] |" in findings and "| 0.81 |" in findings


def test_missing_markers_or_run_fail_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (run / "manifest.json").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert readme_tables.main([str(run), "--readme", str(readme), "--figure", str(tmp_path / "f.png")]) == 2
    assert not (tmp_path / "f.png").exists()
    assert "error: the README needs exactly one '<!-- readme_tables:directions -->'" in capsys.readouterr().err
    assert readme.read_text() == "no markers here\n"
    assert readme_tables.main([str(tmp_path / "nowhere"), "--readme", str(readme), "--figure", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.json" in err and "finished `saefeatures run`" in err


@pytest.mark.dtype
def test_tables_from_the_small_run(small_run, tmp_path):
    _, out, _ = small_run
    before, after = _regenerate(out, tmp_path)
    assert _outside(after) == _outside(before)
    directions = _block(after, "directions")
    for label in ("dense (DiffMean)", "SAE, k = 1", "SAE, k = 4"):
        assert f"| {label} | " in directions, label
    manifest = json.loads((out / "manifest.json").read_text())["machine"]
    assert manifest["cpu"] in directions and f"torch threads {manifest['torch_threads']}" in directions
    findings = _block(after, "findings")
    assert "valence r: PC1 vs human valence (SAE k=4)" in findings and "Tylenol: Spearman of dose vs 'afraid'" in findings
