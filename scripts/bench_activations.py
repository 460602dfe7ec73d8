"""Activation collection throughput: the project's collector vs a naive baseline vs the matmul peak.

    python scripts/bench_activations.py [--records 240] [--layer 20]

On the same records of the shipped corpus, in one run:
  * collector: `collect_pooled` (dtype 'auto': bf16 where the CPU/GPU has bf16 units, else fp32;
    stop after the layer, only the needed hook, length-bucketed);
  * naive: TransformerLens `run_with_cache` over the whole model in float32, batch 1;
  * peak: a plain matrix multiply in the collector's dtype (FLOP/s); the other dtype's peak is
    printed too, to show why 'auto' chose as it did.
Prints tokens/s of each, the collector/naive ratio, and the collector's achieved FLOP/s (2 x
parameters used per token, plus attention) as a fraction of the peak. Goal: >= 3x naive, >= 50% of peak.
"""

from __future__ import annotations

import argparse
import time

import torch

from saefeatures.activations import ActivationConfig, collect_pooled, tokenize_texts
from saefeatures.corpus import load_corpus
from saefeatures.models import load_model, resolve_dtype


def matmul_peak(dtype: torch.dtype = torch.bfloat16, max_n: int = 2048, budget_s: float = 2.0) -> float:
    """FLOP/s of a square matrix multiply in ``dtype``. The size doubles from 256 up to ``max_n``
    while one product stays fast, so a dtype the CPU only emulates (bf16 without bf16 units,
    ~0.3 GFLOP/s here) is measured in seconds rather than minutes."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        a @ b
        one = time.perf_counter() - t0
        if n >= max_n or one * 8 > budget_s / 4:
            break
        n *= 2
    reps = max(1, min(20, int(budget_s / max(one, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_token(model, layers: int, seq: float) -> float:
    """Forward FLOPs per token through ``layers`` blocks: 2 x weights used + attention scores."""
    cfg = model.cfg
    kv = cfg.n_key_value_heads or cfg.n_heads
    attn_w = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * kv)
    mlp_w = cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    attn_scores = 2 * cfg.n_heads * cfg.d_head * seq  # QK^T and AV, causal half of seq on average x 2
    return layers * (2 * (attn_w + mlp_w) + attn_scores)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=240)
    p.add_argument("--layer", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model()
    records = [r for r in load_corpus() if r.kind != "general"][:: 4][: args.records]
    lengths = [len(t) for t in tokenize_texts(model.tokenizer, [r.text for r in records], 256)]
    n_tokens = sum(lengths)
    mean_len = n_tokens / len(lengths)
    hook = f"blocks.{args.layer}.hook_resid_post"

    collect_pooled(model, records[:8], ActivationConfig(), layers=[args.layer])  # warm-up
    t0 = time.perf_counter()
    collect_pooled(model, records, ActivationConfig(), layers=[args.layer])
    t_collect = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in records:
            ids = model.tokenizer(r.text, add_special_tokens=False, return_tensors="pt", truncation=True,
                                  max_length=256).input_ids
            _, cache = model.run_with_cache(ids)
            cache[hook][0, 1:].mean(0)
    t_naive = time.perf_counter() - t0

    dtype = resolve_dtype(ActivationConfig().dtype)
    peaks = {dt: matmul_peak(dt) for dt in (torch.bfloat16, torch.float32)}
    peak = peaks[dtype]
    collect_tps, naive_tps = n_tokens / t_collect, n_tokens / t_naive
    achieved = collect_tps * flops_per_token(model, args.layer + 1, mean_len / 2)
    print(f"records {len(records)}, tokens {n_tokens}, mean length {mean_len:.0f}, layer {args.layer}, "
          f"threads {torch.get_num_threads()}")
    name = str(dtype).removeprefix("torch.")
    print(f"collector ({name}, stop at layer, bucketed): {collect_tps:8.0f} tokens/s")
    print(f"naive (run_with_cache, fp32, batch 1):     {naive_tps:8.0f} tokens/s")
    print(f"ratio collector / naive:                  {collect_tps / naive_tps:8.2f}x")
    for dt, value in peaks.items():
        print(f"{str(dt).removeprefix('torch.'):>8} matmul peak:                     {value / 1e9:8.1f} GFLOP/s")
    print(f"collector achieved:                        {achieved / 1e9:8.0f} GFLOP/s = {achieved / peak:.0%} of peak")


if __name__ == "__main__":
    main()
