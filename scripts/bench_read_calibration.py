"""How `saefeatures read` should calibrate a short text: against neutral stories, or neutral text of
its own length?

`EmotionDirections.read` z-scores one text's projection on each direction against neutral texts,
so the emotions of one text can be ranked (the reader test instead z-scores each direction over a
whole story set, which a single text does not have). The neutral sample is pooled from whole
stories; a one-line text pools early tokens only, whose offset on each direction differs. This
bench cuts external stories (emotion-vector-bench) to their first N tokens and reads each alone
with a finished run's directions, restricted to the set's emotions:

  * raw: the projection itself;
  * stories: z against the directions' neutral sample (what `read` does);
  * length: z against the run's neutral corpus texts (train split) cut to the same N tokens
    (`EmotionDirections.length_calibration`, what `read` does given neutral texts).

It prints single-text top-1 / top-3 over the set's emotions and, on neutral test-split texts cut
the same way, the mean of the largest z (a neutral text should read nothing). Side by side, one run.

    python scripts/bench_read_calibration.py [--run runs/smollm2-135m] \
        [--stories ../shared/data/emotion-vector-bench/stories] [--lengths 16 32 64] [--per-emotion 10]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from saefeatures.corpus import load_corpus
from saefeatures.corpus_import import cap_per_emotion, read_story_set
from saefeatures.study.reading import FinishedRun


def cut(tokenizer, texts: list[str], n: int) -> list[str]:
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids[:n]) for t in texts]


def rank_metrics(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-z, axis=1, kind="stable")
    return float((order[:, 0] == y).mean()), float((order[:, :3] == y[:, None]).any(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/smollm2-135m")
    ap.add_argument("--stories", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                             / "emotion-vector-bench" / "stories"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--per-emotion", type=int, default=10)
    ap.add_argument("--neutral", type=int, default=128, help="neutral texts to calibrate on, and to test on")
    args = ap.parse_args()

    run = FinishedRun.open(args.run)
    sets = run.direction_sets()
    model = run.load_model()
    tok = model.tokenizer
    records = load_corpus(Path(run.manifest["corpus"]["path"]))
    calib = [r.text for r in records if r.emotion == "neutral" and r.split == "train"][: args.neutral]
    held = [r.text for r in records if r.emotion == "neutral" and r.split == run.cfg.evals.split][: args.neutral]
    stories = cap_per_emotion(read_story_set(args.stories), args.per_emotion)
    print(f"# run {args.run}; {len(stories)} stories of {args.stories}; calibration {len(calib)} neutral train "
          f"texts, false alarms on {len(held)} neutral {run.cfg.evals.split} texts; "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'set':6} {'N':>4} {'how':8} {'top1':>6} {'top3':>6} {'neutral max z':>14}")
    for name, dirs in sets.items():
        known = sorted({s.emotion for s in stories} & set(dirs.names))
        kept = [s for s in stories if s.emotion in known]
        y = np.array([known.index(s.emotion) for s in kept])
        cols = [dirs.names.index(e) for e in known]
        mean, std = (t.numpy() for t in dirs.calibration())
        for n in args.lengths:
            proj = dirs.project(dirs.pool(model, cut(tok, [s.text for s in kept], n))).numpy()
            neutral = dirs.project(dirs.pool(model, cut(tok, held, n))).numpy()
            ways = {"raw": (0.0, 1.0), "stories": (mean, std),
                    "length": tuple(t.numpy() for t in dirs.length_calibration(model, calib, n))}
            for how, (m, s) in ways.items():
                z = (proj - m) / s
                top1, top3 = rank_metrics(z[:, cols], y)
                false = float(((neutral - m) / s).max(1).mean()) if how != "raw" else float("nan")
                print(f"{name:6} {n:4d} {how:8} {top1:6.3f} {top3:6.3f} {false:14.2f}")
    print(f"# chance top-1 {1 / len(known):.3f}, top-3 {3 / len(known):.3f} ({len(known)} emotions)")


if __name__ == "__main__":
    main()
