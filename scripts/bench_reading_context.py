"""Does the context the model reads a story in make its directions carry the emotion? (issue 14)

Same shipped stories, three reading contexts, one reader test: DiffMean directions (layer 20, tokens
18-128 of each story, neutral principal components to 50% of variance projected out) from the shipped
corpus's stories of the 19 emotion-vector-bench emotions, read in each context, then reading the
bench's stories (no context; each direction z-scored over them): 19-way top-1, top-3, mean AUROC.

  * plain: the story alone (what `saefeatures run` does);
  * chat_prompt: after the user turn that asked for it (its generation prompt, chat template);
  * named_prefix: after "A story about a person who feels {emotion}.".

Only the story's tokens are pooled. Pooled rows are cached as safetensors in ``--work``.

    python scripts/bench_reading_context.py [--stories ../shared/data/emotion-vector-bench/stories]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saefeatures import emotions as emo
from saefeatures.corpus import load_corpus
from saefeatures.evals.detection import auroc
from saefeatures.models import hf_twin, load_model

DEFAULT_STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion-vector-bench" / "stories"


@torch.inference_mode()
def pool(model, items: list[tuple[list[int], str]], layer: int, skip: int = 16, max_tokens: int = 128,
         batch: int = 16) -> torch.Tensor:
    """Mean residual (after block ``layer``) over each text's tokens from ``skip`` on; prefix ids are read,
    not pooled. A text with no prefix skips its first token too, as the run's pooling does."""
    hf, tok = hf_twin(model), model.tokenizer
    seqs = [(list(p), tok(t, add_special_tokens=False)["input_ids"][:max_tokens]) for p, t in items]
    order = sorted(range(len(seqs)), key=lambda i: sum(map(len, seqs[i])))
    out = torch.zeros(len(seqs), model.cfg.d_model)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(sum(map(len, seqs[i])) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id or 0)
        att = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width)
        for j, i in enumerate(idx):
            p, t = seqs[i]
            ids[j, :len(p) + len(t)] = torch.tensor(p + t)
            att[j, :len(p) + len(t)] = 1
            start = len(p) + min(skip, len(t) // 2) if p else min(1 + skip, max(1, len(t) // 2))
            mask[j, start:len(p) + len(t)] = 1
        h = hf.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[layer + 1].float()
        out[idx] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return out


def diffmean(acts: torch.Tensor, labels: list[str], neutral: torch.Tensor, variance: float = 0.5):
    names = sorted(set(labels))
    y = torch.tensor([names.index(lab) for lab in labels])
    means = torch.stack([acts[y == i].mean(0) for i in range(len(names))])
    diffs = means - means.mean(0)
    _, s, vt = torch.linalg.svd(neutral - neutral.mean(0), full_matrices=False)
    basis = vt[: int(((s**2).cumsum(0) / (s**2).sum() < variance).sum()) + 1]
    diffs = diffs - (diffs @ basis.T) @ basis
    return names, diffs / diffs.norm(dim=1, keepdim=True)


def read(names: list[str], vectors: torch.Tensor, acts: torch.Tensor, labels: list[str]) -> dict[str, float]:
    scores = acts @ vectors.T
    scores = ((scores - scores.mean(0)) / scores.std(0)).numpy()
    y = np.array([names.index(lab) for lab in labels])
    order = np.argsort(-scores, 1)
    return {"top1": float((order[:, 0] == y).mean()), "top3": float((order[:, :3] == y[:, None]).any(1).mean()),
            "auroc": float(np.mean([auroc(scores[:, c], y == c) for c in range(len(names))]))}


def cached(work: Path, name: str, make) -> torch.Tensor:
    path = work / f"{name}.safetensors"
    if not path.exists():
        save_file({"acts": make()}, str(path))
    return load_file(str(path))["acts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", type=Path, default=DEFAULT_STORIES)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-reading-context"))
    ap.add_argument("--per-topic", type=int, default=2, help="bench stories per emotion and topic")
    ap.add_argument("--layer", type=int, default=20)
    args = ap.parse_args()
    if not args.stories.is_dir():
        print(f"skipped: no story set at {args.stories}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    bench = [r for f in sorted(args.stories.glob("*.jsonl")) for r in map(json.loads, f.read_text().splitlines())
             if r["emotion"] in emo.NAMES and r["story_index"] < args.per_topic]
    names = sorted({r["emotion"] for r in bench})
    corpus = load_corpus()
    stories = [r for r in corpus if r.emotion in names]
    neutral = [r for r in corpus if r.emotion == "neutral" and r.split == "train"][:120]
    model = load_model("smollm2-135m-instruct")
    tok = model.tokenizer
    L = args.layer
    read_acts = cached(args.work, f"bench-{len(bench)}-L{L}", lambda: pool(model, [([], r["text"]) for r in bench], L))
    neutral_acts = cached(args.work, f"neutral-L{L}", lambda: pool(model, [([], r.text) for r in neutral], L))

    def chat(prompt: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    contexts = {"plain": lambda r: [], "chat_prompt": lambda r: chat(r.prompt),
                "named_prefix": lambda r: tok(f"A story about a person who feels {r.emotion}.\n\n",
                                              add_special_tokens=False)["input_ids"]}
    print(f"{len(stories)} shipped stories of {len(names)} emotions -> {len(bench)} bench stories, layer {L}")
    print(f"{'context':<14} {'top-1':>6} {'top-3':>6} {'AUROC':>6} {'pool s':>7}")
    for name, prefix in contexts.items():
        t0 = time.perf_counter()
        acts = cached(args.work, f"shipped-{name}-L{L}", lambda: pool(model, [(prefix(r), r.text) for r in stories], L))
        seconds = time.perf_counter() - t0
        res = read(*diffmean(acts, [r.emotion for r in stories], neutral_acts), read_acts, [r["emotion"] for r in bench])
        print(f"{name:<14} {res['top1']:>6.3f} {res['top3']:>6.3f} {res['auroc']:>6.3f} {seconds:>7.0f}")
    print(f"chance: top-1 {1 / len(names):.3f}, top-3 {3 / len(names):.3f}, AUROC 0.5")


if __name__ == "__main__":
    main()
