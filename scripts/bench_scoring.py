"""Latent scoring cost: scoring pass vs activation collection alone, and peak memory vs corpus size.

    python scripts/bench_scoring.py [--records 200 800]

On the same records of the shipped corpus with the shipped SAE: tokens/s of `score_latents`
(forward + SAE encode + accumulation; its histogram-scale warm-up on 32 records timed apart), of
`collect_pooled` (forward + pooling), and of the scoring pass that also fills the activation
store, as `saefeatures run` does (one pass instead of two); then the peak
resident memory of a scoring pass at two corpus sizes, each in a fresh subprocess, to show memory
does not grow with the corpus (it is emotions x latents x histogram bins).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _records(n: int):
    from saefeatures.corpus import load_corpus

    recs = [r for r in load_corpus() if r.kind != "general" and r.split == "train"]
    step = max(1, len(recs) // n)
    return recs[::step][:n]


def _peak(n: int) -> None:
    """Child process: one scoring pass over n records; prints JSON with its peak RSS."""
    from saefeatures.models import load_model
    from saefeatures.sae import load_sae
    from saefeatures.sae.scoring import ScoringConfig, score_latents

    model = load_model()
    sae = load_sae(None, model, layer=18)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    score_latents(model, sae, _records(n), ScoringConfig())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"records": n, "rss_before_mb": before / 1024, "peak_mb": after / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, nargs=2, default=[200, 800])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _peak(args.child)
        return
    from saefeatures.activations import (ActivationConfig, PooledStore, collect_pooled, pooling_meta,
                                         tokenize_texts)
    from saefeatures.models import load_model
    from saefeatures.sae import load_sae
    from saefeatures.sae.scoring import ScoringConfig, score_latents

    model = load_model()
    sae = load_sae(None, model, layer=18)
    records = _records(args.records[0])
    scale = records[:: max(1, len(records) // 32)]  # a small warm-up, timed apart
    n_tokens = sum(len(t) for t in tokenize_texts(model.tokenizer, [r.text for r in records], 256))
    collect_pooled(model, records[:8], ActivationConfig(), layers=[18])  # warm-up
    t0 = time.perf_counter()
    collect_pooled(model, records, ActivationConfig(), layers=[18])
    t_collect = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_latents(model, sae, scale, ScoringConfig(), scale_records=scale)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_latents(model, sae, records, ScoringConfig(), scale_records=scale)
    t_score = time.perf_counter() - t0 - t_warm
    hook = sae.cfg.metadata.hook_name
    with tempfile.TemporaryDirectory() as tmp:
        store = PooledStore(tmp, pooling_meta(model, [hook], ActivationConfig()), records=records)
        t0 = time.perf_counter()
        score_latents(model, sae, records, ScoringConfig(), pooled=store, scale_records=scale)
        t_fused = time.perf_counter() - t0 - t_warm
    print(f"records {len(records)}, tokens {n_tokens}, SAE d_sae {sae.cfg.d_sae}, threads {torch.get_num_threads()}")
    print(f"activation collection alone:         {n_tokens / t_collect:8.0f} tokens/s")
    print(f"scoring pass (forward + encode + stats): {n_tokens / t_score:8.0f} tokens/s "
          f"= {t_score / t_collect:.2f}x the collection time")
    print(f"scoring pass that also pools (as `run`): {n_tokens / t_fused:8.0f} tokens/s; vs collection + "
          f"scoring apart: {t_fused / (t_collect + t_score):.2f}x the time")
    for n in args.records:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"scoring {row['records']:5d} records: peak RSS {row['peak_mb']:.0f} MB "
              f"(after loading model and SAE: {row['rss_before_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
