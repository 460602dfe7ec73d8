"""Which latents assemble each emotion's SAE direction: the top k by rank against a pursuit of the
dense direction among the best-ranked candidates (`saefeatures.sae.assemble`), judged by the reader
test and the run's own held-out stories.

For every k (default the run's) and selection ('rank', and 'pursuit' with each ``--candidates``),
the SAE directions are rebuilt from a finished run's latent scores (stories and concept sentences,
the run's ``directions.concept_weight``), its dense directions and its SAE, then read: an
external story set in the paper's format (default emotion-vector-bench; 19-way top-1, top-3, mean
AUROC, as `saefeatures.evals.reader` reads it), the run's test split (171-way AUROC and top-5), and
the valence / arousal r of PC1 / PC2. The dense row is the reference the SAE rows aim at. The
set's stories are pooled once (cached under ``--work``); nothing else goes through the model.

    python scripts/bench_sae_recipe.py [--run runs/smollm2-135m] \
        [--stories ../shared/data/emotion-vector-bench/stories] [--ks 1 4 16 64] [--candidates 64 256 1024]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from saefeatures.activations import PooledActivations, collect_pooled
from saefeatures.corpus import load_corpus
from saefeatures.corpus_import import cap_per_emotion, read_story_set
from saefeatures.directions import EmotionDirections
from saefeatures.evals.detection import evaluate
from saefeatures.evals.reader import score_reading
from saefeatures.geometry import analyze
from saefeatures.sae import LatentScores, load_sae
from saefeatures.sae.assemble import build_sae
from saefeatures.study.reading import FinishedRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smollm2-135m")
    ap.add_argument("--stories", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                             / "emotion-vector-bench" / "stories"))
    ap.add_argument("--per-emotion", type=int, default=25)
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="default: the run's sae_directions.recipe.ks")
    ap.add_argument("--candidates", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--work", default="runs/bench-sae-recipe")
    args = ap.parse_args()

    run = FinishedRun.open(args.run)
    dense = EmotionDirections.load(run.path / "directions" / "dense")
    scores = LatentScores.load(run.path / "scores")
    concept_dir = run.path / "scores" / "concepts"
    concepts = LatentScores.load(concept_dir) if (concept_dir / "scores.json").exists() else None
    weight = run.cfg.directions.concept_weight
    output_file = run.path / "scores" / "output.safetensors"
    output = load_file(str(output_file))["output"] if output_file.exists() else None
    model = run.load_model()
    sae = load_sae(run.cfg.sae, model, layer=dense.layer)
    acts = PooledActivations.load(next((run.path / "activations").glob("corpus-L*")))
    records = [r for r in load_corpus(run.corpus_file) if r.id in set(acts.ids)]
    test = [r for r in records if r.split == run.cfg.evals.split and r.emotion != "neutral"]
    test_acts = acts.subset([r.id for r in test])[dense.hook]
    stories = [s for s in cap_per_emotion(read_story_set(args.stories), args.per_emotion) if s.emotion in dense.names]
    pooled = collect_pooled(model, stories, run.cfg.activations, Path(args.work) / "stories", layers=[dense.layer],
                            desc="stories")[dense.hook]
    known = sorted({s.emotion for s in stories})
    labels = [s.emotion for s in stories]
    recipe = run.cfg.sae_directions.recipe
    print(f"# run {args.run} (layer {dense.layer}, {len(test)} test stories, concept weight {weight}); "
          f"{len(stories)} stories of {args.stories}, {len(known)} emotions (chance top-1 {1 / len(known):.3f}); "
          f"{platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'k':>4} {'select':>14} {'top1':>6} {'top3':>6} {'AUROC':>6} {'own AUROC':>9} {'top-5':>6} "
          f"{'valence r':>9} {'arousal r':>9} {'cos to dense':>12}")

    def row(k: str, select: str, dirs: EmotionDirections) -> None:
        res = score_reading(dirs.subset(known).project(pooled).numpy(), labels, known)
        own = evaluate(dirs, test_acts, [r.emotion for r in test])
        geo = analyze(dirs)
        cos = np.median([float(dirs.vector(n) @ dense.vector(n)) for n in dirs.names])
        print(f"{k:>4} {select:>14} {res.top1:6.3f} {res.top3:6.3f} {res.auroc:6.3f} {own.auroc:9.3f} {own.top5:6.3f} "
              f"{geo.valence_r:9.3f} {geo.arousal_r:9.3f} {cos:12.3f}", flush=True)

    row("-", "dense", dense)
    for k in args.ks or recipe.ks:
        row(str(k), "rank", build_sae(scores, sae.W_dec, k, dense.layer, dense, replace(recipe, select="rank"),
                                      output, concepts, weight))
        for m in args.candidates:
            dirs = build_sae(scores, sae.W_dec, k, dense.layer, dense, replace(recipe, select="pursuit", candidates=m),
                             output, concepts, weight)
            row(str(k), f"pursuit {m}", dirs)


if __name__ == "__main__":
    main()
