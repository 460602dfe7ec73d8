"""Corpus audit and reader test, side by side: the shipped corpus vs an external story set.

    python scripts/bench_reader.py [--stories ../shared/data/emotion-vector-bench/stories] \
        [--work runs/bench-reader] [--per-emotion N] [--train-per-emotion N] [--neutral N] \
        [--directions RUN/directions/dense]

1. The model-free audit (`saefeatures.audit`) of the shipped corpus (171-way) and of the story set
   imported as a corpus (`saefeatures.corpus_import`; topic-disjoint splits, unknown emotions left out).
2. The reader test (`saefeatures.evals.reader`): dense directions of the shipped corpus at the
   default config's layer and pooling (built here from its train split unless --directions is
   given) reading every story of the set (or --per-emotion of each), z-scored per direction.
3. For contrast, held-out detection with dense directions built from the set's own train topics,
   reading its test topics (the same pooled rows, so no extra forward pass).
Pooled activations are cached under --work, so a rerun only prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_STORIES = "../shared/data/emotion-vector-bench/stories"
"""emotion-vector-bench (MIT), beside the repository in CI and benchmarks; not shipped."""


def main() -> None:
    from saefeatures.activations import PooledActivations, collect_pooled, hook_name
    from saefeatures.audit import audit_corpus
    from saefeatures.study.config import load_config
    from saefeatures.corpus import load_corpus
    from saefeatures.corpus_import import import_corpus
    from saefeatures.directions import EmotionDirections, build_dense
    from saefeatures.evals.detection import evaluate
    from saefeatures.evals.reader import read_stories
    from saefeatures.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stories", default=DEFAULT_STORIES,
                   help="external story set: a JSONL(.gz) file or a directory of them (default: %(default)s)")
    p.add_argument("--config", default="configs/smollm2-135m.yaml")
    p.add_argument("--work", default="runs/bench-reader", help="cache of pooled activations and directions")
    p.add_argument("--per-emotion", type=int, help="stories of each emotion read (default: all)")
    p.add_argument("--directions", help="dense directions to read with (default: built from the shipped corpus)")
    p.add_argument("--train-per-emotion", type=int,
                   help="train stories of each emotion the shipped directions are built from (default: all, ~16)")
    p.add_argument("--neutral", type=int, help="neutral train texts used (default: all, 460)")
    args = p.parse_args()
    if args.stories == DEFAULT_STORIES and not Path(DEFAULT_STORIES).exists():
        print(f"bench_reader: skipped, no story set at {DEFAULT_STORIES}; pass --stories FILE_OR_DIR.")
        sys.exit(0)
    cfg = load_config(args.config)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: python scripts/bench_reader.py --stories {args.stories} --work {args.work}"
          + (f" --per-emotion {args.per_emotion}" if args.per_emotion else "")
          + (f" --directions {args.directions}" if args.directions else "")
          + (f" --train-per-emotion {args.train_per_emotion}" if args.train_per_emotion else "")
          + (f" --neutral {args.neutral}" if args.neutral else ""))
    print(f"torch threads: {torch.get_num_threads()}")

    shipped = load_corpus()
    t0 = time.perf_counter()
    audits = {"shipped corpus": audit_corpus(shipped)}
    audit_s = time.perf_counter() - t0
    imported = work / "stories.jsonl.gz"
    report = import_corpus(args.stories, imported, model_id="external", drop_unknown=True)
    bench = load_corpus(imported)
    audits[f"{Path(args.stories).resolve().parent.name} (imported)"] = audit_corpus(bench)
    print(f"\nimported {report.n_records} stories ({report.stats['n_emotions']} emotions, splits "
          f"{report.stats['splits']}); left out: {report.dropped_unknown}")
    print(f"\nBag-of-words audit (train topics -> test topics; shipped corpus audited in {audit_s:.1f} s)")
    print(f"{'corpus':34s} {'classes':>7s} {'test':>5s} {'top1':>6s} {'top5':>6s} {'AUROC':>6s} {'cluster':>7s}")
    for name, a in audits.items():
        print(f"{name:34s} {a.n_classes:7d} {a.n_test:5d} {a.top1:6.3f} {a.top5:6.3f} {a.auroc:6.3f} "
              f"{a.cluster_acc:7.3f}  (chance top1 {1 / a.n_classes:.3f})")

    model = load_model(cfg.model.name)
    layer, acfg = cfg.model.layer, cfg.activations
    hook = hook_name(layer, acfg.hook)
    seen: dict[str, int] = {}
    train = []
    for r in shipped:
        cap = args.neutral if r.emotion == "neutral" else args.train_per_emotion
        if r.split == "train" and (cap is None or seen.get(r.emotion, 0) < cap):
            seen[r.emotion] = seen.get(r.emotion, 0) + 1
            train.append(r)
    neutral_ids = [r.id for r in train if r.emotion == "neutral"]
    t0 = time.perf_counter()
    pooled = collect_pooled(model, train, acfg, work / f"shipped-train-L{layer}", layers=[layer], desc="shipped train")
    neutral = pooled.subset(neutral_ids)[hook]
    if args.directions:
        dense = EmotionDirections.load(args.directions)
    else:
        stories = [r for r in train if r.emotion != "neutral"]
        dense = build_dense(pooled.subset([r.id for r in stories])[hook], [r.emotion for r in stories], neutral,
                            layer, cfg.directions, hook)
        dense.save(work / "dense-shipped")
    print(f"\nshipped train split pooled ({len(train)} records, cached) in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    res = read_stories(model, {"dense": dense}, args.stories, acfg, cache_dir=work, per_emotion=args.per_emotion)["dense"]
    read_s = time.perf_counter() - t0
    print(f"reader: {res.n} stories pooled (cached) and read in {read_s:.0f} s; skipped emotions: {res.skipped}")

    # held-out detection on the set's own topics, from the rows the reader pooled
    ext = PooledActivations.load(next(work.glob(f"reader-L{layer}-*")))
    have = set(ext.ids)
    own_train = [r for r in bench if r.split == "train" and r.id in have]
    own_test = [r for r in bench if r.split == "test" and r.id in have]
    own = build_dense(ext.subset([r.id for r in own_train])[hook], [r.emotion for r in own_train], neutral, layer,
                      cfg.directions, hook)
    det = evaluate(own, ext.subset([r.id for r in own_test])[hook], [r.emotion for r in own_test])

    print(f"\nDense directions at layer {layer} reading the external stories")
    print(f"{'directions -> stories':58s} {'n':>5s} {'k':>3s} {'top1':>6s} {'top3/5':>6s} {'AUROC':>6s}")
    print(f"{'shipped corpus (train) -> all external, z-scored':58s} {res.n:5d} {len(res.emotions):3d} "
          f"{res.top1:6.3f} {res.top3:6.3f} {res.auroc:6.3f}   (chance top1 {1 / len(res.emotions):.3f}, top3 "
          f"{3 / len(res.emotions):.3f})")
    print(f"{'external train topics -> external test topics (top5)':58s} {det.n_records:5d} {det.n_classes:3d} "
          f"{det.top1:6.3f} {det.top5:6.3f} {det.auroc:6.3f}")


if __name__ == "__main__":
    main()
