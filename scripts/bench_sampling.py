"""Tokens/s of sampled generation on the embedded model: this project's `NucleusSampling` (topk
nucleus, draw among it, greedy decode) vs transformers' own temperature + top-p warpers and
multinomial draw, side by side in one run, with the steering evaluations' settings (batch 64, 32
new tokens, temperature 0.8, top-p 0.95, repetition penalty 1.1).

Regenerate the numbers (on an otherwise idle machine):
    OMP_NUM_THREADS=2 python scripts/bench_sampling.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saefeatures.neutral import NEUTRAL_PROMPTS
from saefeatures.generation import sampling_kwargs
from saefeatures.models import hf_twin, load_model
from saefeatures.steering import render_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3, help="best of N")
    args = p.parse_args()

    model = load_model()
    hf, tok = hf_twin(model), model.tokenizer
    texts = render_prompts(tok, (NEUTRAL_PROMPTS * args.batch)[: args.batch], True)
    tok.padding_side, side = "left", tok.padding_side
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, repetition_penalty=1.1,
                  pad_token_id=tok.pad_token_id)
    paths = {
        "nucleus_sampling": sampling_kwargs(args.temperature, args.top_p),
        "transformers_top_p": {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": None},
    }
    rows = {}
    with torch.inference_mode():
        hf.generate(**enc, **common, **paths["nucleus_sampling"])  # warm-up
        for name, kwargs in paths.items():
            best = float("inf")
            for r in range(args.repeats):
                torch.manual_seed(r)
                t0 = time.perf_counter()
                hf.generate(**enc, **common, **kwargs)
                best = min(best, time.perf_counter() - t0)
            rows[name] = {"seconds": round(best, 2), "tokens_per_s": round(args.batch * args.new_tokens / best, 1)}
    print(json.dumps({
        "model": model.cfg.model_name, "batch": args.batch, "new_tokens": args.new_tokens,
        "prompt_tokens": enc.input_ids.shape[1], "threads": torch.get_num_threads(), **rows,
        "speedup_nucleus_vs_transformers": round(rows["transformers_top_p"]["seconds"] / rows["nucleus_sampling"]["seconds"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
