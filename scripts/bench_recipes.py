"""Corpus recipes side by side (issue 14): which texts give directions that read external stories.

    python scripts/bench_recipes.py [--stories ../shared/data/emotion-vector-bench/stories] \
        [--work runs/bench-recipes] [--per-emotion 8] [--recipes say,prefill,cause,diary] \
        [--bench-per-topic 2] [--temperature 0.8] [--steer 0.1 --steer-directions RUN/directions/dense]
        [--report-only]

For the emotions of the external story set that are among the 171 (19 for emotion-vector-bench),
each recipe (`saefeatures.recipes`) writes ``--per-emotion`` texts per emotion on the same training
topics (``prompts`` train topics, two texts each; never the external texts), the model reads each
text plain (pooled at the config layer after 16 skipped tokens, 128 tokens at most, as the reader
test pools; with and without the emotion's word tokens; and its recognition rank of the intended
emotion among the 171 words), dense DiffMean directions are built (neutral: 120 train neutral
texts of the shipped corpus) and read the external stories (``--bench-per-topic`` of each emotion
and topic), z-scored per direction as `saefeatures.evals.reader` does.

Rows besides the generated recipes: the shipped corpus with 8, 16 (its train split) and all ~24
stories per emotion; recognition and near-duplicate filters; the shipped stories plus each recipe's
(more per emotion); ten templated one-line sentences per emotion naming it (a reference, not
model-written), alone and added with weight 2 to each recipe's directions (as the default dense
recipe adds its concept sentences); mixes. With ``--steer`` the recipes are written steered along
each emotion's direction from a run (`saefeatures.writer_steering`, ``corpus.build.steer``).
Everything computed is cached under --work (JSON texts, safetensors activations): a rerun
resumes generation at the first unfinished chunk and only prints once all is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_STORIES = "../shared/data/emotion-vector-bench/stories"
LAYER, SKIP, MAXTOK = 20, 16, 128
TEMPLATED = ("I feel so {e}.", "She was {e} all day.", "He felt {e} when he heard the news.",
             "We were all {e}.", "I have never been this {e}.", "They looked {e}.",
             "Being {e} is exhausting.", "You seem {e} today.", "The man was {e} and could not hide it.",
             "Today I am {e}.")
"""Reference row: templated one-liners naming the emotion (written here, not by the model)."""


def trim_tail(text: str) -> str:
    """Cut a trailing unfinished sentence."""
    text = text.strip()
    end = max(text.rfind(c) for c in '.!?"')
    return text[: end + 1] if 0 < end < len(text) - 1 else text


def near_duplicates(texts: list[str], labels: list[str], thresh: float = 0.5) -> list[bool]:
    """Keep mask: a text whose word-trigram Jaccard with an earlier kept text of its emotion exceeds thresh is dropped."""
    keep, seen = [], {}
    for t, e in zip(texts, labels):
        w = re.findall(r"[a-z']+", t.lower())
        g = set(zip(w, w[1:], w[2:]))
        dup = any(len(g & h) / max(1, len(g | h)) > thresh for h in seen.get(e, []))
        keep.append(not dup)
        if not dup:
            seen.setdefault(e, []).append(g)
    return keep


def best_per_emotion(rank, logp, labels, frac):
    """Indices of the best-recognised ``frac`` of each emotion's texts (lowest rank first)."""
    out = []
    for e in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == e]
        idx.sort(key=lambda i: int(rank[i]))
        out += idx[: max(1, round(frac * len(idx)))]
    return sorted(out)


def random_per_emotion(labels, frac, seed=0):
    rng = random.Random(seed)
    out = []
    for e in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == e]
        out += rng.sample(idx, max(1, round(frac * len(idx))))
    return sorted(out)


def main() -> None:
    from safetensors.torch import load_file, save_file

    from saefeatures import prompts
    from saefeatures.corpus import clean_text, load_corpus
    from saefeatures.emotions import emotion_forms
    from saefeatures.corpus_import import read_story_set
    from saefeatures.directions import DirectionConfig, EmotionDirections, build_dense
    from saefeatures.emotions import NAMES
    from saefeatures.evals.reader import score_reading
    from saefeatures.generation import GenerationConfig, Generator, batch_seed
    from saefeatures.models import hf_twin, load_model
    from saefeatures.recipes import RECIPES, character_name, read_texts
    from saefeatures.writer_steering import writer_vectors, writing_steered

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stories", default=DEFAULT_STORIES)
    p.add_argument("--work", default="runs/bench-recipes")
    p.add_argument("--per-emotion", type=int, default=8)
    p.add_argument("--recipes", default="say,prefill,cause,diary")
    p.add_argument("--bench-per-topic", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64, help="prompts generated together")
    p.add_argument("--temperature", type=float, default=GenerationConfig.temperature,
                   help="sampling temperature of the generated recipes (use a fresh --work per value)")
    p.add_argument("--draw", type=int, default=0,
                   help="another draw of the generated recipes: other train topics and seeds (0: the first)")
    p.add_argument("--steer", type=float, default=0.0,
                   help="write the generated recipes steered along each emotion's direction from --steer-directions, "
                        "x the mean residual norm (corpus.build.steer; use a fresh --work per value)")
    p.add_argument("--steer-directions", default="runs/smollm2-135m/directions/dense",
                   help="directions folder to steer the writer with (a run on the shipped corpus)")
    p.add_argument("--report-only", action="store_true", help="print what is cached, generate and read nothing")
    args = p.parse_args()
    if not Path(args.stories).exists():
        print(f"bench_recipes: skipped, no story set at {args.stories}.")
        sys.exit(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipes = [r for r in args.recipes.split(",") if r]
    print(f"command: python scripts/bench_recipes.py --stories {args.stories} --work {args.work} "
          f"--per-emotion {args.per_emotion} --recipes {args.recipes} --bench-per-topic {args.bench_per_topic}"
          + (f" --draw {args.draw}" if args.draw else "") + f" --temperature {args.temperature}"
          + (f" --steer {args.steer} --steer-directions {args.steer_directions}" if args.steer else ""))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"machine: {cpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), float32", flush=True)

    bench = [s for s in read_story_set(args.stories) if s.emotion in NAMES
             and dict(s.extra).get("story_index", s.index) < args.bench_per_topic]
    names = sorted({s.emotion for s in bench})
    print(f"external stories read: {len(bench)} ({len(names)} emotions: {', '.join(names)})")

    _model = {}

    def model():
        if not _model:
            m = load_model("smollm2-135m-instruct", dtype="float32")
            _model["m"] = m
            _model["hf"] = hf_twin(m).float().eval()
        return _model["m"], _model["hf"]

    def read_set(name: str, texts: list[str], labels: list[str], recognize: bool = True) -> dict:
        """Cached reading of a text set: pooled, pooled_masked, rank."""
        path = work / f"read_{name}.safetensors"
        meta = work / f"read_{name}.json"
        if path.exists() and meta.exists() and json.loads(meta.read_text())["texts"] == texts:
            return load_file(path)
        if args.report_only:
            return {}
        m, hf = model()
        t0 = time.time()
        out = read_texts(hf, m.tokenizer, texts, labels, layer=LAYER, skip_first=SKIP, max_tokens=MAXTOK,
                         recognize=recognize)
        print(f"  read {name}: {len(texts)} texts in {time.time() - t0:.0f} s", flush=True)
        save_file({k: v.contiguous() for k, v in out.items()}, path)
        meta.write_text(json.dumps({"texts": texts, "labels": labels}))
        return out

    B = read_set("bench", [s.text for s in bench], [s.emotion for s in bench], recognize=False)
    shipped_all = load_corpus()
    neutral = [r for r in shipped_all if r.emotion == "neutral" and r.split == "train"][:120]
    N = read_set("neutral", [r.text for r in neutral], ["neutral"] * len(neutral), recognize=False)
    shipped = [r for r in shipped_all if r.emotion in names]
    S = read_set("shipped", [r.text for r in shipped], [r.emotion for r in shipped])

    # generation: same topics for every recipe
    train_topics = prompts.topics_by_split()["train"]
    plan = []
    for e in names:
        topics = random.Random(f"bench-recipes:{e}" + (f":{args.draw}" if args.draw else "")).sample(
            train_topics, (args.per_emotion + 1) // 2)
        plan += [(e, t, k) for t in topics for k in range(2)][: args.per_emotion]
    gens = {}
    sfx = f"_d{args.draw}" if args.draw else ""
    steering = {}

    def writer():
        """(vector per emotion, hook) of --steer, computed once."""
        if not steering:
            dirs = EmotionDirections.load(args.steer_directions)
            m, hf = model()
            steering.update(vectors=writer_vectors(hf, m.tokenizer, dirs, args.steer), hook=dirs.hook)
        return steering["vectors"], steering["hook"]
    for rname in recipes:
        rec = RECIPES[rname]
        path = work / f"gen_{rname}{sfx}.json"
        done = json.loads(path.read_text()) if path.exists() else []
        if len(done) < len(plan) and not args.report_only:
            m, hf = model()
            gen = Generator(hf, m.tokenizer, GenerationConfig(max_new_tokens=rec.max_new_tokens or 128,
                                                              temperature=args.temperature, batch_size=args.chunk,
                                                              dtype="float32"))
            t0 = time.time()
            for s0 in range(len(done), len(plan), args.chunk):
                chunk = plan[s0: s0 + args.chunk]
                rendered = [rec.render(t, e, character_name(args.draw, f"{rname}/{e}/{t}/{k}")) for e, t, k in chunk]
                banned = None
                if rec.ban_words and args.steer:
                    sys.exit("--steer steers mixed-emotion chunks; use a recipe without banned words (prefill).")
                if rec.ban_words:  # one emotion per call so its words can be banned
                    outs = []
                    for e in sorted({c[0] for c in chunk}):
                        rows = [i for i, c in enumerate(chunk) if c[0] == e]
                        o = gen.generate([rendered[i][0] for i in rows], seed=batch_seed(args.draw, f"{rname}/{s0}/{e}"),
                                         banned=sorted(emotion_forms(e)), prefills=[rendered[i][1] for i in rows])
                        outs += list(zip(rows, o))
                    outs = [o for _, o in sorted(outs)]
                else:
                    steered = contextlib.nullcontext()
                    if args.steer:  # one vector per row: each prompt's own emotion
                        vectors, hook = writer()
                        steered = writing_steered(hf, torch.stack([vectors[e] for e, _, _ in chunk]), hook)
                    with steered:
                        outs = gen.generate([r[0] for r in rendered], seed=batch_seed(args.draw, f"{rname}/{s0}"),
                                            banned=banned, prefills=[r[1] for r in rendered])
                for (e, t, k), (prompt, pre), o in zip(chunk, rendered, outs):
                    text = trim_tail(pre + o) if pre else clean_text(o)
                    done.append({"emotion": e, "topic": t, "prompt": prompt, "prefill": pre, "text": text})
                path.write_text(json.dumps(done, indent=1, ensure_ascii=False))
                print(f"  generated {rname}: {len(done)}/{len(plan)} in {time.time() - t0:.0f} s", flush=True)
        if len(done) == len(plan):
            gens[rname] = done

    G = {}
    for rname, items in gens.items():
        r = read_set(rname + sfx, [i["text"] for i in items], [i["emotion"] for i in items])
        if r:
            G[rname] = (items, r)
    T_texts = [t.format(e=e) for e in names for t in TEMPLATED]
    T_labels = [e for e in names for _ in TEMPLATED]
    T = read_set("templated", T_texts, T_labels, recognize=False)

    if not B or not N:
        print("bench or neutral not read yet")
        return
    neutral_acts = N["pooled"]
    bl = [s.emotion for s in bench]
    rows = []

    def evaluate(label: str, acts: torch.Tensor, labels: list[str], kept: str = "", note: str = "",
                 concepts: bool = False):
        """One row: dense directions of ``acts`` (with ``concepts``: plus the templated one-liners,
        weight 2, as the default dense recipe adds its concept sentences) reading the external stories."""
        counts = {e: labels.count(e) for e in names}
        if min(counts.values()) == 0:
            rows.append((label, len(labels), kept, None, note + f" (no texts for {[e for e, c in counts.items() if not c]})"))
            return
        d = build_dense(acts, labels, neutral_acts, LAYER, DirectionConfig(concept_weight=2.0 if concepts else 0.0),
                        f"blocks.{LAYER}.hook_resid_post", concepts=(T["pooled"], T_labels) if concepts else None)
        d = d.subset(names)
        res = score_reading(d.project(B["pooled"]).numpy(), bl, names)
        rows.append((label, len(labels), kept, res, note))

    def control(label: str, acts: torch.Tensor, labels: list[str], frac: float, draws: int = 10):
        """Random per-emotion subsets: mean (sd) of the metrics over ``draws`` draws."""
        res = []
        for seed in range(draws):
            idx = random_per_emotion(labels, frac, seed)
            d = build_dense(acts[idx], [labels[i] for i in idx], neutral_acts, LAYER, DirectionConfig(),
                            f"blocks.{LAYER}.hook_resid_post").subset(names)
            res.append(score_reading(d.project(B["pooled"]).numpy(), bl, names))
        mean = type("R", (), {k: float(np.mean([getattr(r, k) for r in res])) for k in ("top1", "top3", "auroc")})
        sd = {k: float(np.std([getattr(r, k) for r in res])) for k in ("top1", "top3", "auroc")}
        rows.append((label, len(idx), f"{len(idx)}/{len(labels)}", mean,
                     f"sd over draws: top1 {sd['top1']:.3f}, AUROC {sd['auroc']:.3f}"))

    # the shipped corpus
    s_lab = [r.emotion for r in shipped]
    first8, seen = [], {}
    for i, r in enumerate(shipped):
        if r.split == "train" and seen.get(r.emotion, 0) < 8:
            seen[r.emotion] = seen.get(r.emotion, 0) + 1
            first8.append(i)
    train = [i for i, r in enumerate(shipped) if r.split == "train"]
    if S:
        sel = lambda idx: (S["pooled"][idx], [s_lab[i] for i in idx])  # noqa: E731
        evaluate("shipped, 8/emotion (train)", *sel(first8), note="baseline")
        evaluate("shipped, train (~16/emotion)", *sel(train))
        evaluate("shipped, all splits (~24/emotion)", *sel(list(range(len(shipped)))))
        ranks = S["rank"]
        for k in (3, 10, 30):
            idx = [i for i in range(len(shipped)) if ranks[i] <= k]
            evaluate(f"shipped all, recognition rank<={k}", *sel(idx), kept=f"{len(idx)}/{len(shipped)}")
        for k in (10, 30):
            idx = [i for i in range(len(shipped)) if S["rank_raw"][i] <= k]
            evaluate(f"shipped all, uncalibrated recognition rank<={k}", *sel(idx), kept=f"{len(idx)}/{len(shipped)}")
        for frac in (0.5, 0.33):
            for key in ("rank", "rank_raw"):
                idx = best_per_emotion(S[key], S["logp"], s_lab, frac)
                evaluate(f"shipped all, best {frac:.0%}/emotion by {key.replace('rank', 'recognition')}", *sel(idx),
                         kept=f"{len(idx)}/{len(shipped)}")
            control(f"shipped all, random {frac:.0%}/emotion (control, 10 draws)", S["pooled"], s_lab, frac)
        keep = near_duplicates([r.text for r in shipped], s_lab)
        idx = [i for i, k in enumerate(keep) if k]
        evaluate("shipped all, near-duplicate filter", *sel(idx), kept=f"{len(idx)}/{len(shipped)}")
        print(f"shipped recognition: median rank {float(ranks.float().median()):.0f}, top-1 "
              f"{float((ranks == 1).float().mean()):.3f}, top-10 {float((ranks <= 10).float().mean()):.3f} (of 171)")
    for rname, (items, r) in G.items():
        lab = [i["emotion"] for i in items]
        names_it = np.mean([bool(re.search(r"\b" + re.escape(i["emotion"]) + r"\b", i["text"][len(i["prefill"]):],
                                           re.I)) for i in items])
        evaluate(f"{rname}", r["pooled"], lab, note=f"names it (after prefill) {names_it:.2f}")
        if T:
            evaluate(f"{rname} + templated one-liners (weight 2)", r["pooled"], lab, concepts=True)
        evaluate(f"{rname}, emotion tokens masked", r["pooled_masked"], lab)
        idx = best_per_emotion(r["rank"], r["logp"], lab, 0.5)
        evaluate(f"{rname}, best 50%/emotion by recognition", r["pooled"][idx], [lab[i] for i in idx],
                 kept=f"{len(idx)}/{len(items)}", note="recognition reads the named word when the text names it")
        control(f"{rname}, random 50%/emotion (control, 10 draws)", r["pooled"], lab, 0.5)
        print(f"{rname} recognition: median rank {float(r['rank'].float().median()):.0f}, top-10 "
              f"{float((r['rank'] <= 10).float().mean()):.3f}; example: {items[0]['text'][:300]!r}")
    if args.draw:  # this draw together with the first one: twice the texts per emotion
        for rname, (items, r) in G.items():
            first = work / f"read_{rname}.safetensors"
            if first.exists():
                r0 = load_file(first)
                lab0 = json.loads((work / f"read_{rname}.json").read_text())["labels"]
                evaluate(f"{rname}, draws 0+{args.draw} ({2 * args.per_emotion}/emotion)",
                         torch.cat([r0["pooled"], r["pooled"]]), lab0 + [i["emotion"] for i in items])
    if T:
        evaluate("templated one-liners (reference, not model-written)", T["pooled"], T_labels)
    # mixes
    mix = [m for m in ("say", "diary") if m in G]
    for a in ("prefill", "cause"):
        for b in mix:
            if a in G:
                ia, ra = G[a]
                ib, rb = G[b]
                evaluate(f"{a} + {b}", torch.cat([ra["pooled"], rb["pooled"]]),
                         [i["emotion"] for i in ia] + [i["emotion"] for i in ib])
    if S:
        for rname, (items, r) in G.items():  # the shipped stories and this recipe's: more per emotion
            evaluate(f"shipped all + {rname} ({len(items) // len(names)}/emotion more)",
                     torch.cat([S["pooled"], r["pooled"]]), s_lab + [i["emotion"] for i in items])
        for b in mix:
            ib, rb = G[b]
            evaluate(f"shipped 8/emotion + {b}", torch.cat([S["pooled"][first8], rb["pooled"]]),
                     [s_lab[i] for i in first8] + [i["emotion"] for i in ib])
    if len(G) >= 2:
        keys = list(G)
        evaluate(f"all generated ({'+'.join(keys)})", torch.cat([G[k][1]["pooled"] for k in keys]),
                 [i["emotion"] for k in keys for i in G[k][0]])

    print(f"\nDense directions (layer {LAYER}, skip {SKIP}, max {MAXTOK} tokens, neutral {len(neutral)} texts) "
          f"reading {len(bench)} external stories, {len(names)}-way; chance top1 {1 / len(names):.3f}, "
          f"top3 {3 / len(names):.3f}, AUROC 0.5")
    print(f"{'recipe':58s} {'n':>5s} {'kept':>9s} {'top1':>6s} {'top3':>6s} {'AUROC':>6s}  note")
    out = []
    for label, n, kept, res, note in rows:
        if res is None:
            print(f"{label:58s} {n:5d} {kept:>9s}      -      -      -  {note}")
            continue
        print(f"{label:58s} {n:5d} {kept:>9s} {res.top1:6.3f} {res.top3:6.3f} {res.auroc:6.3f}  {note}")
        out.append({"recipe": label, "n": n, "kept": kept, "top1": res.top1, "top3": res.top3, "auroc": res.auroc,
                    "note": note})
    (work / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
