"""README's results tables, regenerated from a finished run.

    python scripts/readme_tables.py RUN [--readme README.md] [--figure docs/findings.png]

Reads RUN/metrics.json and RUN/manifest.json and rewrites, in the README, the text between each pair
of marker comments ``<!-- readme_tables:NAME -->`` and ``<!-- /readme_tables:NAME -->``:
``directions`` (detection, geometry and EmoBank of every direction set) and ``findings`` (the
report's findings box: each headline number with its 95% bootstrap interval, null baseline and the
paper's value). Each block ends with the machine the run computed on (CPU or GPU, dtypes, torch
threads) and the command that wrote it. Text outside the markers is left as it is. Also draws the
findings figure (the report's, `saefeatures.report.findings_figure`) to the README's hero image.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from saefeatures.errors import UserError
from saefeatures.files import save_figure, write_text
from saefeatures.keys import lookup
from saefeatures.report.findings import headline
from saefeatures.report.findings_figure import figure_title, findings_figure
from saefeatures.report.page import direction_sets

BLOCKS = ("directions", "findings")
DIRECTION_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("auroc", "AUROC"), ("valence_r", "valence r (PC1)"),
                     ("arousal_r", "arousal r (PC2)"), ("arousal_best_r", "best arousal r (PC1-4)"),
                     ("emobank_valence_spearman", "EmoBank valence ρ"), ("emobank_arousal_spearman", "EmoBank arousal ρ"),
                     ("cosine_to_dense_median", "cosine to dense"))


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a bare '|' would end it)."""
    return text.replace("|", "\\|")


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else ""


def machine_line(manifest: dict[str, Any], run: str) -> str:
    """Where the numbers came from: the device (CPU model and its watched flags, or the GPU), the
    dtype of each stage, torch threads, and the command that wrote the block."""
    m = manifest.get("machine") or {}
    if m.get("cuda_device"):
        device = m["cuda_device"]
    else:
        flags = ", ".join(m.get("cpu_flags") or []) or "none of AVX2/AVX-512/bf16/AMX"
        device = f"{m.get('cpu', 'unknown CPU')} ({flags}; {m.get('cpu_count', '?')} cores)"
    dtypes = ", ".join(f"{k} {v}" for k, v in (m.get("dtypes") or {}).items()) or "unknown"
    return (f"_From `{run}` (`python scripts/readme_tables.py {run}`), on {device}; dtypes: {dtypes}; "
            f"torch threads {m.get('torch_threads', '?')}._")


def directions_table(metrics: dict[str, Any]) -> str:
    layer = lookup(metrics, "model.layer")
    ks = sorted((int(k[1:]) for k in (metrics.get("sae") or {}) if re.fullmatch(r"k\d+", k)))
    sections = [("dense", "dense (DiffMean)")] + [(f"sae.k{k}", f"SAE, k = {k}") for k in ks]
    head = f"| directions (layer {layer}, test split) | " + " | ".join(t for _, t in DIRECTION_COLUMNS) + " |"
    rows = [f"| {label} | " + " | ".join(_num(lookup(metrics, f"{s}.{c}")) for c, _ in DIRECTION_COLUMNS) + " |"
            for s, label in sections if lookup(metrics, s)]
    return "\n".join([head, "|" + "---|" * (len(DIRECTION_COLUMNS) + 1), *rows])


def findings_table(metrics: dict[str, Any], manifest: dict[str, Any]) -> str:
    rows = ["| measure | this run | 95% CI | null baseline: 5-95% (mean) | percentile in null | paper |",
            "|---|---|---|---|---|---|"]
    for f in headline(metrics, direction_sets(metrics, manifest)):
        ci = f"[{_num(f.ci['lower'], 2)}, {_num(f.ci['upper'], 2)}]" if f.ci else ""
        null = (f"{_cell(f.null_kind)}: [{_num(f.null['p05'], 2)}, {_num(f.null['p95'], 2)}] ({_num(f.null['mean'], 2)})"
                if f.null else "")
        pct = f"{f.null['percentile']:.1f}" if f.null else ""
        rows.append(f"| {_cell(f.measure)} | {_num(f.value)} | {ci} | {null} | {pct} | {_cell(f.paper)} |")
    return "\n".join(rows)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between the ``name`` markers replaced by ``body``; UserError when
    the README lacks the pair."""
    begin, end = f"<!-- readme_tables:{name} -->", f"<!-- /readme_tables:{name} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"the README needs exactly one '{begin}' followed by one '{end}' (on lines of their own) "
                        f"around the {name} table; add them where the table goes")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    files = [run / "metrics.json", run / "manifest.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: give the directory of a finished `saefeatures run`")
    return json.loads(files[0].read_text()), json.loads(files[1].read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory")
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--readme", type=Path, default=root / "README.md")
    parser.add_argument("--figure", type=Path, default=root / "docs" / "findings.png",
                        help="where the findings figure goes (the README's hero image)")
    args = parser.parse_args(argv)
    try:
        metrics, manifest = read_run(args.run)
        text = args.readme.read_text()
        line = machine_line(manifest, str(args.run))
        tables = {"directions": directions_table(metrics), "findings": findings_table(metrics, manifest)}
        for name in BLOCKS:
            text = replace_block(text, name, f"{tables[name]}\n\n{line}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = headline(metrics, direction_sets(metrics, manifest))
    if rows:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        save_figure(args.figure, findings_figure(rows, figure_title(metrics)), dpi=110)
    write_text(args.readme, text)
    print(f"wrote {', '.join(BLOCKS)} tables into {args.readme}" + (f" and {args.figure}" if rows else "")
          + f" from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
