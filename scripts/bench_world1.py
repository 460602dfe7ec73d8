"""The single-process latent-scoring pass of this tree against an earlier revision, side by side.

    python scripts/bench_world1.py [--against REV] [--records N] [--rounds R]

torch.distributed came in with one code path (a single process is world size 1, whose collectives
do nothing): this measures that the single process pays nothing for it. ``--against`` (default: the
last commit before the distributed merge) is checked out into a temporary git worktree; each round
runs `score_latents` on the same records (the first ``--records`` of this tree's corpus, train
split, the shipped model and this tree's shipped SAE, one thread) once with each tree's code, in fresh processes, in
alternating order. Prints each time, the medians and their ratio, and the load average (the
figures of a shared machine depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_DISTRIBUTED = "4f015a7^1"
"""The main line just before 'Merge branch distributed'."""

CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from saefeatures.activations import ActivationConfig
from saefeatures.corpus import load_corpus
from saefeatures.models import load_model
from saefeatures.sae import ScoringConfig, load_sae, score_latents
corpus, n, sae_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
records = [r for r in load_corpus(corpus) if r.split == "train"][:n]
model = load_model()
sae = load_sae(sae_dir, model, layer=18)
t0 = time.perf_counter()
scores = score_latents(model, sae, records, ScoringConfig(), ActivationConfig())
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "check": [float(scores.fire.sum()), float(scores.hist.sum()), float(scores.count.sum())]}))
"""


def run_once(tree: Path, corpus: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sae_dir = ROOT / "saefeatures" / "data" / "sae" / "smollm2-135m-instruct-L18"
    out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(n), str(sae_dir)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=BEFORE_DISTRIBUTED, help="git revision to compare with")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from saefeatures.corpus import DEFAULT_CORPUS

    rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    times: dict[str, list[float]] = {"this tree": [], rev: []}
    counts = set()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                order = [("this tree", ROOT), (rev, old)] if r % 2 == 0 else [(rev, old), ("this tree", ROOT)]
                for name, tree in order:
                    res = run_once(tree, DEFAULT_CORPUS, args.records)
                    times[name].append(res["seconds"])
                    counts.add(tuple(res["check"]))
                    print(f"round {r}: {name:>10}: {res['seconds']:.1f} s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    if len(counts) != 1:
        raise SystemExit(f"the trees' statistics differ (active tokens, histogram counts, records): {sorted(counts)}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"load average after: {os.getloadavg()}")
    print(f"{args.records} records, one thread; median this tree {med['this tree']:.1f} s, {rev} {med[rev]:.1f} s; "
          f"ratio this/{rev} {med['this tree'] / med[rev]:.3f}")


if __name__ == "__main__":
    main()
