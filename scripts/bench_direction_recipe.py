"""Which layer, how much neutral variance to project out and how much weight the concept sentences
get, judged by the reader test (issue 14).

The dense recipe (`saefeatures.directions.build_dense`) at each layer a finished run pooled (its
layer sweep) and for several ``neutral_variance`` values (the paper: 0.5), built from the run's
train split's stories alone, reads an external story set in the paper's format (default
emotion-vector-bench) as `saefeatures.evals.reader` does: 19-way top-1, top-3, mean AUROC. For
contrast, rows 'lda': class means whitened by the shrunk within-class covariance (``--shrinkage``,
towards a scaled identity) instead of the neutral projection. Rows 'concept': the shipped recipe,
the stories' direction plus ``--concept-weights`` times that of the concept sentences
(`saefeatures.concepts`; weight 0 is the stories alone), each with its own-split detection (AUROC
and 171-way top-5 on the run's test split) and the valence / arousal r of PC1 / PC2 beside it. No
story of the set is used to build anything. The run's pooled corpus activations are reused; the
set's stories and the concept sentences are pooled once at every layer (cached under ``--work``).

    python scripts/bench_direction_recipe.py [--run runs/smollm2-135m] \
        [--stories ../shared/data/emotion-vector-bench/stories] [--per-emotion 25] \
        [--variances 0 0.25 0.5 0.75 0.9] [--shrinkage 0.3 0.6 0.9] [--concept-weights 0 0.5 1 2 4]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from saefeatures.activations import PooledActivations, collect_pooled
from saefeatures.concepts import concept_sentences
from saefeatures.corpus import load_corpus
from saefeatures.corpus_import import cap_per_emotion, read_story_set
from saefeatures.directions import DirectionConfig, build_dense
from saefeatures.evals.detection import evaluate
from saefeatures.evals.reader import score_reading
from saefeatures.geometry import analyze
from saefeatures.hook_names import parse
from saefeatures.study.reading import FinishedRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smollm2-135m")
    ap.add_argument("--stories", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                             / "emotion-vector-bench" / "stories"))
    ap.add_argument("--per-emotion", type=int, default=25)
    ap.add_argument("--variances", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    ap.add_argument("--concept-weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--work", default="runs/bench-direction-recipe")
    args = ap.parse_args()

    run = FinishedRun.open(args.run)
    corpus_dir = next((run.path / "activations").glob("corpus-L*"))
    acts = PooledActivations.load(corpus_dir)
    hooks = sorted(acts.acts, key=lambda h: parse(h)[0])
    layers = [parse(h)[0] for h in hooks]
    records = [r for r in load_corpus(run.corpus_file) if r.id in set(acts.ids)]
    train = [r for r in records if r.split == "train" and r.emotion != "neutral"]  # as stage_dense
    neutral = [r for r in records if r.split == "train" and r.emotion == "neutral"]
    model = run.load_model()
    cfg = run.cfg.activations  # the run's pooling
    stories = cap_per_emotion(read_story_set(args.stories), args.per_emotion)
    stories = [s for s in stories if s.emotion in {r.emotion for r in train}]
    pooled = collect_pooled(model, stories, cfg, Path(args.work) / "stories", layers=layers, desc="stories")
    known = sorted({s.emotion for s in stories})
    test = [r for r in records if r.split == run.cfg.evals.split and r.emotion != "neutral"]
    anchors = concept_sentences(sorted({r.emotion for r in train}))
    concepts = collect_pooled(model, anchors, cfg, Path(args.work) / "concepts", layers=layers, desc="concepts")
    print(f"# run {args.run} ({len(train)} train stories, {len(neutral)} neutral); {len(stories)} stories of "
          f"{args.stories}, {len(known)} emotions (chance top-1 {1 / len(known):.3f}); "
          f"{platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'layer':>5} {'recipe':>6} {'param':>6} {'PCs':>4} {'top1':>6} {'top3':>6} {'AUROC':>6}")
    labels = [r.emotion for r in train]
    for hook, layer in zip(hooks, layers):
        x = acts.subset([r.id for r in train])[hook]
        n = acts.subset([r.id for r in neutral])[hook]
        for v in args.variances:
            dirs = build_dense(x, labels, n, layer, DirectionConfig(neutral_variance=v), hook)
            scores = dirs.subset(known).project(pooled[hook]).numpy()
            res = score_reading(scores, [s.emotion for s in stories], known)
            print(f"{layer:5d} {'dense':>6} {v:6.2f} {dirs.metadata['neutral_pcs']:4d} {res.top1:6.3f} {res.top3:6.3f} "
                  f"{res.auroc:6.3f}", flush=True)
        for lam in args.shrinkage:
            means, grand, vectors = lda_directions(x.double(), labels, lam)
            scores = ((pooled[hook].double() - grand) @ vectors[[means.index(e) for e in known]].T).numpy()
            res = score_reading(scores, [s.emotion for s in stories], known)
            print(f"{layer:5d} {'lda':>6} {lam:6.2f} {'-':>4} {res.top1:6.3f} {res.top3:6.3f} {res.auroc:6.3f}",
                  flush=True)
        for w in args.concept_weights:
            dirs = build_dense(x, labels, n, layer, DirectionConfig(concept_weight=w), hook,
                               concepts=(concepts[hook], [a.emotion for a in anchors]))
            res = score_reading(dirs.subset(known).project(pooled[hook]).numpy(), [s.emotion for s in stories], known)
            own = evaluate(dirs, acts.subset([r.id for r in test])[hook], [r.emotion for r in test])
            geo = analyze(dirs)
            print(f"{layer:5d} {'concept':>6} {w:6.2f} {dirs.metadata['neutral_pcs']:4d} {res.top1:6.3f} {res.top3:6.3f} "
                  f"{res.auroc:6.3f}   own AUROC {own.auroc:.3f} top-5 {own.top5:.3f}, valence r {geo.valence_r:.3f}, "
                  f"arousal r {geo.arousal_r:.3f}", flush=True)


def lda_directions(x: torch.Tensor, labels: list[str], shrinkage: float) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Class names, the mean of the class means, and per class its mean minus that, whitened by the
    within-class covariance shrunk towards a scaled identity (unit norm)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    means = torch.zeros(len(names), x.shape[1], dtype=x.dtype).index_add_(0, y, x) / torch.bincount(y)[:, None]
    grand = means.mean(0)
    within = x - means[y]
    cov = within.T @ within / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(len(cov), dtype=x.dtype)
    vectors = torch.linalg.solve(cov, (means - grand).T).T
    return names, grand, vectors / vectors.norm(dim=1, keepdim=True)


if __name__ == "__main__":
    main()
