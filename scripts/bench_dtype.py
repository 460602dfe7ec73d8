"""Forward-pass tokens/s of the embedded model in float32 and in bfloat16 (the `with_dtype` copy
that `dtype: auto` uses where `bf16_is_fast`), side by side: what forcing the bf16 path
(``SAEFEATURES_BF16=1``, e.g. `make test`'s second pass) costs on a CPU without bf16 units, where
bf16 matmuls are emulated, and what it gains on one with them. Also prints the machine record.

Regenerate the numbers (on an otherwise idle machine):
    OMP_NUM_THREADS=2 python scripts/bench_dtype.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saefeatures.dtype_copies import with_dtype
from saefeatures.study.machine import machine_info
from saefeatures.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="best of N")
    args = p.parse_args()
    model = load_model()
    tokens = torch.randint(100, model.cfg.d_vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            run = with_dtype(model, dtype)
            run(tokens[:1, :16])  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(tokens, return_type="logits")
                best = min(best, time.perf_counter() - t0)
            rows[str(dtype).removeprefix("torch.")] = {
                "seconds": round(best, 2), "tokens_per_s": round(tokens.numel() / best, 1)}
    print(json.dumps({"batch": args.batch, "tokens": args.tokens, **rows,
                      "bf16_over_fp32_time": round(rows["bfloat16"]["seconds"] / rows["float32"]["seconds"], 2),
                      "machine": machine_info()}, indent=2))


if __name__ == "__main__":
    main()
