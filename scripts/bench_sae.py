#!/usr/bin/env python
"""Benchmark the SAE stage: quality of the shipped SAE and throughput of SAE training.

    python scripts/bench_sae.py --config configs/smollm2-135m.yaml --out runs/bench/sae.json

Quality: SAELens evals of the config's SAE (the shipped one by default) on the corpus' held-out
split (sae.eval: split, max_tokens, ce_tokens), checked against the targets of issue 5
(explained variance >= 0.8 at L0 <= 64, dead latents < 10%, CE loss recovered >= 0.8).
Throughput: tokens/s of activation generation (SAELens' ActivationsStore on the model, float32,
and bfloat16 autocast where the CPU or GPU has bf16 units) and of the SAE update (SAELens'
SAETrainer steps at the config's width, k and batch size), which says which part bounds
training; plus the figures the shipped SAE's own training run recorded (train_info.json).
Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from saefeatures.study.config import load_config
from saefeatures.models import bf16_is_fast, load_model
from saefeatures.hook_names import hook_name
from saefeatures.sae.data import held_out_texts, pack_texts, special_token_ids
from saefeatures.sae.train import llm_autocast, training_sae_config
from saefeatures.study.sae_stages import evaluate_run_sae
from saefeatures.sae import load_sae, sae_info, shipped_sae_dir

TARGETS = {"explained_variance": (">=", 0.8), "l0": ("<=", 64), "dead_fraction": ("<", 0.1),
           "ce_loss_recovered": (">=", 0.8)}


def check(evals: dict) -> dict:
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    return {k: {"value": evals[k], "target": f"{op} {v}", "ok": ops[op](evals[k], v)}
            for k, (op, v) in TARGETS.items()}


def generation_rate(model, contexts, hook, d_in, batch, n_batches, autocast) -> float:
    """Token positions/s of SAELens' activation generation (forward to the hook's layer)."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore(
        model=model, dataset=Dataset.from_dict({"tokens": contexts}), streaming=False, hook_name=hook,
        hook_head_index=None, context_size=len(contexts[0]), d_in=d_in, n_batches_in_buffer=1,
        total_training_tokens=10**9, store_batch_size_prompts=batch, train_batch_size_tokens=batch,
        prepend_bos=False, normalize_activations="none", device=torch.device(str(model.cfg.device)),
        dtype="float32", autocast_lm=autocast)
    store.get_raw_llm_batch()  # warm-up
    t, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += store.get_raw_llm_batch()[0].shape[0]
    return n / (time.perf_counter() - t)


def update_rate(tcfg, d_in, acts, n_steps, device) -> float:
    """Tokens/s of SAELens' SAE training step (forward, AuxK, backward, Adam) at the config's size."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cfg = training_sae_config(tcfg, d_in, device)
    sae = get_sae_training_class(tcfg.architecture)[0](sae_cfg)
    b = tcfg.train_batch_size_tokens
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=b * (n_steps + 5), train_batch_size_samples=b,
                                          lr=tcfg.lr, lr_end=tcfg.lr, device=device, dead_feature_window=5,
                                          logger=LoggingConfig(log_to_wandb=False)),
                         sae=sae, data_provider=iter(()))
    trainer.activation_scaler.scaling_factor = d_in**0.5 / acts.norm(dim=-1).mean().item()
    batches = [acts[torch.randint(len(acts), (b,))] for _ in range(n_steps + 5)]
    for x in batches[:5]:  # warm-up, and some latents count as dead so AuxK runs as in training
        trainer.step(x)
        trainer.n_training_steps += 1
    t = time.perf_counter()
    for x in batches[5:]:
        trainer.step(x)
        trainer.n_training_steps += 1
    return n_steps * b / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smollm2-135m.yaml")
    p.add_argument("--sae", help="SAE directory (default: the config's SAE)")
    p.add_argument("--out", help="write the results here (JSON)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--gen-batches", type=int, default=8)
    p.add_argument("--update-steps", type=int, default=40)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config)
    tcfg = cfg.sae.train
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    layer = cfg.model.layer
    result: dict = {"config": args.config, "threads": torch.get_num_threads(), "device": cfg.model.device}

    if not args.skip_quality:
        evals = evaluate_run_sae(cfg, sae_path=args.sae, model=model).to_dict()
        result["quality"] = {"evals": evals, "targets": check(evals)}

    texts = held_out_texts(cfg.corpus.path, model.tokenizer, "train", tcfg.kinds, tcfg.chat_fraction)
    contexts = pack_texts(model.tokenizer, texts[:400], tcfg.context_size)
    hook = cfg.sae.hook or hook_name(layer)
    b = tcfg.store_batch_size_prompts
    gen = {"float32": generation_rate(model, contexts, hook, model.cfg.d_model, b, args.gen_batches, False)}
    if bf16_is_fast(model.cfg.device):  # elsewhere bf16 is emulated: minutes per batch, nothing to learn
        gen["bfloat16_autocast"] = generation_rate(model, contexts, hook, model.cfg.d_model, b,
                                                   args.gen_batches, True)
    tokens = torch.tensor(contexts[:32], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
    keep = ~torch.isin(tokens, torch.tensor(special_token_ids(model.tokenizer), device=tokens.device))
    acts = cache[hook][keep].float()
    upd = update_rate(tcfg, model.cfg.d_model, acts, args.update_steps, str(model.cfg.device))
    used = gen.get("bfloat16_autocast" if llm_autocast(tcfg, str(model.cfg.device)) else "float32", gen["float32"])
    result["throughput"] = {
        "activation_generation_positions_per_s": {k: round(v, 1) for k, v in gen.items()},
        "sae_update_tokens_per_s": round(upd, 1),
        "streaming_training_tokens_per_s_estimate": round(1 / (1 / used + 1 / upd), 1),
        "bound_by": "activation generation" if used < upd else "SAE update",
        "sae": {"architecture": tcfg.architecture, "width": tcfg.width, "k": tcfg.k,
                "batch_tokens": tcfg.train_batch_size_tokens},
    }
    sae_dir = Path(args.sae) if args.sae else (Path(cfg.sae.path) if cfg.sae.path else
                                               shipped_sae_dir(cfg.model.name, layer))
    train_info = sae_info(sae_dir).get("train_info")
    if train_info:
        result["shipped_training_run"] = {k: train_info[k] for k in (
            "training_tokens", "wall_s", "tokens_per_s", "activation_generation", "sae_update",
            "bound_by", "command") if k in train_info}
    load_sae(sae_dir, model, layer=layer)  # the shipped SAE matches the config's model and layer
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
