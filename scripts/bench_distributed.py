"""The latent-scoring pass on 1 and on 2 processes (torch.distributed, one thread each), side by side.

    python scripts/bench_distributed.py [--records N] [--sizes 1 2] [--device cpu|cuda]

The shipped model and SAE score the train split of the shipped corpus (its first ``--records``
records; all of them by default) with `score_latents`, once per world size, each rank a spawned
process started as `torchrun` starts its workers (gloo on CPUs; NCCL, one GPU per rank, with
``--device cuda``). Timed from a barrier after every rank has loaded the model to the combined
statistics: records/s, tokens/s and the scaling efficiency (time on 1 / (ranks x time on N));
the count and histogram statistics are checked to be identical across world sizes. Prints the
machine's load average before and after, since a shared machine's figures depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _records(n: int | None):
    from saefeatures.corpus import load_corpus

    recs = [r for r in load_corpus() if r.split == "train"]
    return recs[:n] if n else recs


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from saefeatures.activations import ActivationConfig, tokenize_texts
    from saefeatures.distributed import close_world, init_world
    from saefeatures.models import load_model
    from saefeatures.sae import load_sae
    from saefeatures.sae.scoring import ScoringConfig, score_latents

    world = init_world()
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    model = load_model(device=device)
    sae = load_sae(None, model, layer=18)
    records = _records(args.records)
    pooling = ActivationConfig()
    world.sync("loaded")
    t0 = time.perf_counter()
    scores = score_latents(model, sae, records, ScoringConfig(), pooling, world=world)
    seconds = time.perf_counter() - t0
    if world.leader:
        tokens = sum(len(t) for t in tokenize_texts(model.tokenizer, [r.text for r in records], pooling.max_tokens))
        Path(out).write_text(json.dumps({
            "ranks": size, "seconds": round(seconds, 1), "records": len(records), "tokens": tokens,
            "records_per_s": round(len(records) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "count_sum": int(scores.count.sum()), "hist_sum": int(scores.hist.sum()),
            "fire_sum": int(scores.fire.sum()), "max_record_sum": int(scores.max_record.sum())}))
    close_world(world)


def run(size: int, args: argparse.Namespace, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"ranks{size}.json"
    mp.start_processes(_rank, args=(size, port, args, str(out)), nprocs=size, start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=None, help="first N train records (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    print("load average before:", os.getloadavg(), "cpus:", os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(n, args, Path(tmp)) for n in args.sizes]
    base = rows[0]
    for r in rows:
        r["speedup"] = round(base["seconds"] / r["seconds"], 2)
        r["efficiency"] = round(base["seconds"] * base["ranks"] / (r["ranks"] * r["seconds"]), 2)
        r["same_statistics"] = all(r[k] == base[k] for k in ("count_sum", "hist_sum", "fire_sum", "max_record_sum"))
    print("load average after:", os.getloadavg())
    print(f"{'ranks':>5} {'records':>7} {'tokens':>8} {'seconds':>8} {'rec/s':>7} {'tok/s':>8} {'speedup':>7} "
          f"{'effic.':>6} same")
    for r in rows:
        print(f"{r['ranks']:>5} {r['records']:>7} {r['tokens']:>8} {r['seconds']:>8} {r['records_per_s']:>7} "
              f"{r['tokens_per_s']:>8} {r['speedup']:>7} {r['efficiency']:>6} {r['same_statistics']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
