"""Tokens/s of steered generation: fast path (transformers + hooks) vs unsteered transformers vs
TransformerLens, on the embedded model, batch 8, 64 new tokens, KV cache, greedy; and whether the
fast and TransformerLens paths produce the same tokens.

Regenerate the numbers (on an otherwise idle machine; timings under CPU contention are noise):
    OMP_NUM_THREADS=2 python scripts/bench_steering.py
    OMP_NUM_THREADS=2 python scripts/bench_steering.py --directions RUN/directions/dense --emotion desperate
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from saefeatures.directions import EmotionDirections
from saefeatures.neutral import NEUTRAL_PROMPTS
from saefeatures.models import load_model
from saefeatures.steering import Steering, SteeringSpec, generate_steered_full


def random_sae(d_in: int, hook: str, d_sae: int = 4608, k: int = 32):
    """A TopK SAE with the shipped SAE's shape (same cost), for timing when none is shipped."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    sae = SAE.from_dict(handle_config_defaulting({
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu",
        "hook_name": hook, "hook_head_index": None, "prepend_bos": False, "context_size": 256,
        "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    with torch.no_grad():
        d = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0)), dim=1)
        sae.W_dec.copy_(d)
        sae.W_enc.copy_(d.T)
    return sae.eval()


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directions", help="directions directory; default: a random unit direction (speed only)")
    p.add_argument("--emotion", default="desperate")
    p.add_argument("--strength", type=float, default=0.1)
    p.add_argument("--sae", help="SAE directory; default: the shipped SAE, else a random one of its shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="best of N for the fast runs")
    p.add_argument("--tl-repeats", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_model()
    layer, hook = 18, "blocks.18.hook_resid_post"
    if args.directions:
        dirs = EmotionDirections.load(args.directions)
        layer, hook = dirs.layer, dirs.hook
    else:
        v = torch.nn.functional.normalize(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), dim=0)
        dirs = EmotionDirections([args.emotion], layer, v[None], hook, "random")
    sae_note = "shipped"
    try:
        from saefeatures.sae import load_sae

        sae = load_sae(args.sae, model, layer=layer)
    except (FileNotFoundError, ValueError) as e:
        sae, sae_note = random_sae(model.cfg.d_model, hook), f"random TopK 4608/k32 ({type(e).__name__})"
    direction = Steering.from_spec(SteeringSpec(emotions={args.emotion: args.strength}), model, directions=dirs)
    clamp = Steering.from_spec(SteeringSpec(emotions={args.emotion: args.strength}, method="clamp"), model,
                               directions=dirs, sae=sae)
    prompts = (NEUTRAL_PROMPTS * args.batch)[: args.batch]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, batch_size=args.batch)
    n_tokens = args.batch * args.new_tokens

    def run(steering, backend):
        return generate_steered_full(model, steering, prompts, backend=backend, **kw)

    run(None, "hf")  # warm-up
    rows = {}
    for name, steering, backend, repeats in (
        ("hf_unsteered", None, "hf", args.repeats),
        ("hf_steered_direction", direction, "hf", args.repeats),
        ("hf_steered_clamp", clamp, "hf", args.repeats),
        ("tl_steered_direction", direction, "tl", args.tl_repeats),
        ("tl_unsteered", None, "tl", args.tl_repeats),
    ):
        seconds, gens = timed(lambda: run(steering, backend), repeats)
        rows[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1), "gens": gens}
    base = rows["hf_unsteered"]["tokens_per_s"]
    # Greedy agreement, each path stopping at its end-of-sequence token (min_new_tokens, used for
    # timing, would suppress that token on the transformers path only).
    agree = {}
    for name, steering in (("direction", direction), ("clamp", clamp)):
        fast = generate_steered_full(model, steering, prompts, backend="hf", max_new_tokens=args.new_tokens,
                                     batch_size=args.batch)
        ref = generate_steered_full(model, steering, prompts, backend="tl", max_new_tokens=args.new_tokens,
                                    batch_size=args.batch)
        agree[name] = f"{sum(a.new_ids == b.new_ids for a, b in zip(fast, ref))}/{len(prompts)}"
    report = {
        "model": model.cfg.model_name, "dtype": str(model.cfg.dtype), "batch": args.batch,
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "sae": sae_note,
        **{k: {kk: vv for kk, vv in v.items() if kk != "gens"} for k, v in rows.items()},
        "ratio_fast_direction_vs_hf_unsteered": round(rows["hf_steered_direction"]["tokens_per_s"] / base, 3),
        "ratio_fast_clamp_vs_hf_unsteered": round(rows["hf_steered_clamp"]["tokens_per_s"] / base, 3),
        "ratio_tl_steered_vs_hf_unsteered": round(rows["tl_steered_direction"]["tokens_per_s"] / base, 3),
        "greedy_same_tokens_fast_vs_tl": agree,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
