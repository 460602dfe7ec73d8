"""Train an SAE on the studied layer with SAELens, offline, resumable; ship it.

The training text is the model's own corpus, so the SAE sees what the study feeds the model:
emotion stories and dialogues, neutral texts (factual, how-to, flat dialogues) and a general
mix the model wrote on diverse instructions (corpus kind 'general'), from the train and val
splits (the test split stays held out for evals). Each text is rendered either plain or in
the chat template (its prompt as the user turn, the text as the assistant turn) with
probability `chat_fraction`; texts are shuffled and packed into contexts that start with a
special token, with special-token separators, and every special-token position is excluded
(SAELens' ``exclude_special_tokens``), as are the first `skip_positions` positions of every
context (SAELens' ``seqpos_slice``): when a context starts mid-text, the token after the start
token becomes a second attention sink with ~100x the usual norm. When training needs more
tokens than one pass holds, each further epoch is re-shuffled and re-rendered with a new seed.

SAELens' `LanguageModelSAETrainingRunner` then trains with the toolkit's model
(``override_model``) on that tokenized dataset (``override_dataset``). Checkpoints go to
``OUT/checkpoints/<n_tokens>``; rerunning the same command resumes from the latest complete
one. The final SAE is written to ``OUT/sae`` atomically, with ``train_info.json`` (tokens, wall
time, throughput of activation generation vs SAE update, loss curve).

Example:
    >>> from saefeatures.config import load_config
    >>> from saefeatures.sae_training import train_sae
    >>> result = train_sae(load_config("configs/smollm2-135m.yaml"), out_dir="runs/sae/smollm2-L20")
    >>> result.sae_dir, result.info["wall_s"]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, RunConfig
from .files import write_json
from .models import bf16_is_fast
from .saes import (ARCHITECTURES, CFG_FILE, WEIGHTS_FILE, SAETrainConfig,
                   pack_texts, resid_hook, special_token_ids)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .corpus import CorpusRecord

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_state.pt",
                    "activations_store_state.safetensors", "runner_cfg.json")
"""Files of a complete SAELens checkpoint (runner_cfg.json is written last)."""


# ---------------------------------------------------------------- the training text


def render_texts(records: Sequence[CorpusRecord], tokenizer: Any, chat_fraction: float,
                 seed: int) -> list[str]:
    """Each record's text, plain or (with probability `chat_fraction`) as a chat exchange."""
    rng = random.Random(seed)
    texts = []
    for r in records:
        if rng.random() < chat_fraction and getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.text}],
                tokenize=False))
        else:
            texts.append(r.text)
    return texts


def held_out_texts(corpus_path: str | Path | None, tokenizer: Any, split: str = "test",
                   kinds: Sequence[str] = ("story", "dialogue", "neutral", "general"),
                   chat_fraction: float = 0.5, seed: int = 0) -> list[str]:
    """Texts of one corpus split, rendered like the training mix (for `evaluate_sae`)."""
    from .corpus import load_corpus

    records = [r for r in load_corpus(corpus_path, kinds=kinds) if r.split == split]
    if not records:
        raise ValueError(f"The corpus has no kept records of kinds {list(kinds)} in split '{split}'.")
    return render_texts(records, tokenizer, chat_fraction, seed + 10_007)


@dataclass
class TokenData:
    """The packed training contexts and what they hold."""

    contexts: list[list[int]]
    n_texts: int
    texts_per_kind: dict[str, int]
    tokens_per_epoch: int
    epochs: int
    sha256: str
    """Hash of the contexts: a resumed run must see the same data."""


def build_token_data(records: Sequence[CorpusRecord], tokenizer: Any, cfg: SAETrainConfig,
                     n_positions: int) -> TokenData:
    """Pack re-shuffled, re-rendered epochs of `records` until they hold `n_positions` tokens."""
    if not records:
        raise ValueError("No training records: check sae.train.kinds and sae.train.splits against the corpus.")
    contexts: list[list[int]] = []
    epoch, per_epoch = 0, 0
    while len(contexts) * cfg.context_size < n_positions:
        order = list(records)
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        packed = pack_texts(tokenizer, render_texts(order, tokenizer, cfg.chat_fraction,
                                                    cfg.seed * 1000 + epoch), cfg.context_size)
        if not packed:
            raise ValueError(f"The corpus holds less than one context of {cfg.context_size} tokens.")
        per_epoch = per_epoch or len(packed) * cfg.context_size
        contexts.extend(packed)
        epoch += 1
    digest = hashlib.sha256(torch.tensor(contexts, dtype=torch.int32).numpy().tobytes()).hexdigest()
    return TokenData(contexts, len(records), dict(Counter(r.kind for r in records)), per_epoch,
                     epoch, digest)


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    sae_dir: Path
    info: dict[str, Any]


def _short_name(model_name: str) -> str:
    return Path(model_name).name if Path(model_name).exists() else model_name.split("/")[-1]


def default_out_dir(run_cfg: RunConfig, layer: int) -> Path:
    """Where `train_sae` writes when not told: sae.train.out, else runs/sae/<model>-L<layer>."""
    return Path(run_cfg.sae.train.out or f"runs/sae/{_short_name(run_cfg.model.name)}-L{layer}")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the most training tokens, or None."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return max(done, key=lambda p: int(p.name), default=None)


def _training_sae_config(cfg: SAETrainConfig, d_in: int, device: str) -> Any:
    from sae_lens.registry import get_sae_training_class

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"sae.train.architecture must be one of {', '.join(ARCHITECTURES)}, "
                         f"got '{cfg.architecture}'.")
    config_cls = get_sae_training_class(cfg.architecture)[1]
    kw: dict[str, Any] = dict(d_in=d_in, d_sae=cfg.width, dtype="float32", device=device,
                              normalize_activations=cfg.normalize_activations)
    if cfg.architecture == "topk":
        kw.update(k=int(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient)
    elif cfg.architecture == "batchtopk":
        kw.update(k=float(cfg.k), aux_loss_coefficient=cfg.aux_loss_coefficient)
    elif cfg.architecture == "jumprelu":
        kw.update(l0_coefficient=cfg.sparsity_coefficient)
    else:
        kw.update(l1_coefficient=cfg.sparsity_coefficient)
    kw.update(cfg.options)
    try:
        return config_cls(**kw)
    except TypeError as e:
        raise ValueError(f"sae.train.options: {e}. See {config_cls.__name__} in SAELens for its fields.") from None


class _Meter:
    """Wall time and token counts of one function, wrapped around an instance attribute."""

    def __init__(self) -> None:
        self.seconds, self.tokens, self.calls = 0.0, 0, 0

    def wrap(self, fn: Any, count: Any = None) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            if count is not None:
                self.tokens += count(out)
            return out
        return timed


@contextlib.contextmanager
def _environment(**env: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s, h in handlers.items():  # SAELens installs its own handlers for checkpoint-on-interrupt
            signal.signal(s, h)


def train_sae(run_cfg: RunConfig, out_dir: str | Path | None = None, model: HookedTransformer | None = None,
              resume: bool = True, records: Sequence[CorpusRecord] | None = None) -> TrainResult:
    """Train (or resume, or reuse) an SAE at the run config's layer with SAELens.

    Args:
        run_cfg: the run config; uses model, corpus.path, tracking and sae.train.
        out_dir: output directory; default sae.train.out, else runs/sae/<model>-L<layer>.
        model: the loaded HookedTransformer (else loaded from run_cfg.model).
        resume: continue from the latest checkpoint in out_dir (False: start over).
        records: training records (default: the corpus, sae.train.kinds and splits).

    Example:
        >>> result = train_sae(load_config("configs/smollm2-135m.yaml"))
        >>> sae = load_sae(result.sae_dir, model, layer=20)
    """
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from datasets import Dataset

    from .corpus import load_corpus
    from .models import default_layer, load_model, model_identity

    tcfg, mcfg = run_cfg.sae.train, run_cfg.model
    layer = mcfg.layer if mcfg.layer is not None else default_layer(mcfg.name, model.cfg.n_layers if model else None)
    hook = run_cfg.sae.hook or resid_hook(layer)
    name = _short_name(mcfg.name)
    out = Path(out_dir or default_out_dir(run_cfg, layer))
    final = out / "sae"
    if (final / "train_info.json").is_file():
        log.info("SAE already trained: %s (delete it to retrain)", final)
        return TrainResult(final, json.loads((final / "train_info.json").read_text()))
    if tcfg.n_batches_in_buffer * tcfg.context_size < tcfg.train_batch_size_tokens:
        raise ValueError("sae.train.n_batches_in_buffer x context_size must be >= train_batch_size_tokens "
                         f"({tcfg.n_batches_in_buffer} x {tcfg.context_size} < {tcfg.train_batch_size_tokens}).")
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(mcfg.name, dtype=mcfg.dtype, device=mcfg.device)
    device = str(model.cfg.device)
    if records is None:
        records = [r for r in load_corpus(run_cfg.corpus.path, kinds=tcfg.kinds) if r.split in tcfg.splits]
    steps = tcfg.training_tokens // tcfg.train_batch_size_tokens
    extra_batches = tcfg.n_batches_for_norm_estimate + 2 * tcfg.n_batches_in_buffer
    data = build_token_data(records, model.tokenizer, tcfg,
                            int(1.1 * (tcfg.training_tokens + extra_batches * tcfg.train_batch_size_tokens)))

    checkpoints = out / "checkpoints"
    state_file = out / "train_state.json"
    ckpt = latest_checkpoint(checkpoints) if resume else None
    if ckpt is not None:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("data_sha256") != data.sha256:
            raise ValueError(f"The training data changed since the checkpoint in {checkpoints} "
                             "(corpus or sae.train settings). Rerun with --no-resume to start over.")
        log.info("resuming SAE training from %s", ckpt)
    elif checkpoints.exists():
        shutil.rmtree(checkpoints)
    write_json(state_file, {"data_sha256": data.sha256, "layer": layer, "hook": hook})

    exclude = special_token_ids(model.tokenizer)
    use_wandb = run_cfg.tracking.wandb and run_cfg.tracking.mode != "disabled"
    partial = out / "final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    identity = model_identity(model)
    rcfg = LanguageModelSAERunnerConfig(
        sae=_training_sae_config(tcfg, model.cfg.d_model, device),
        model_name=identity.name, hook_name=hook,
        dataset_path=f"saefeatures-corpus:{run_cfg.corpus.path or 'shipped'}",
        is_dataset_tokenized=True, streaming=False, context_size=tcfg.context_size,
        seqpos_slice=(tcfg.skip_positions, None) if tcfg.skip_positions else (None,),
        n_batches_in_buffer=tcfg.n_batches_in_buffer, training_tokens=tcfg.training_tokens,
        store_batch_size_prompts=tcfg.store_batch_size_prompts,
        train_batch_size_tokens=tcfg.train_batch_size_tokens, prepend_bos=False,
        exclude_special_tokens=exclude, device=device, autocast_lm=llm_autocast(tcfg, device), seed=tcfg.seed,
        lr=tcfg.lr, lr_warm_up_steps=min(tcfg.lr_warm_up_steps, steps // 2),
        lr_decay_steps=int(tcfg.lr_decay_fraction * steps), dead_feature_window=tcfg.dead_feature_window,
        feature_sampling_window=max(tcfg.dead_feature_window, 100), n_eval_batches=2,
        eval_batch_size_prompts=4, n_batches_for_norm_estimate=tcfg.n_batches_for_norm_estimate,
        n_checkpoints=tcfg.n_checkpoints, checkpoint_path=str(checkpoints), output_path=str(partial),
        resume_from_checkpoint=str(ckpt) if ckpt else None, verbose=False,
        logger=LoggingConfig(log_to_wandb=use_wandb, wandb_project=run_cfg.tracking.project,
                             run_name=f"sae-{name}-L{layer}-{tcfg.architecture}-{tcfg.width}",
                             log_weights_to_wandb=False, wandb_log_frequency=tcfg.wandb_log_frequency,
                             eval_every_n_wandb_logs=tcfg.eval_every_n_wandb_logs))
    rcfg.checkpoint_path = str(checkpoints)  # SAELens appends a random id; keep it stable to resume
    rcfg.model_from_pretrained_kwargs = {}  # saefeatures loads models without weight processing

    torch.manual_seed(tcfg.seed)
    runner = LanguageModelSAETrainingRunner(
        rcfg, override_dataset=Dataset.from_dict({"tokens": data.contexts}), override_model=model)
    gen, evals, curve = _Meter(), _Meter(), []
    store = runner.activations_store
    store.get_raw_llm_batch = gen.wrap(store.get_raw_llm_batch, lambda out: out[0].shape[0])
    runner.evaluator = evals.wrap(runner.evaluator)
    forward = runner.sae.training_forward_pass

    def recorded(step_input: Any) -> Any:
        output = forward(step_input)
        with torch.no_grad():
            x = output.sae_in
            fvu = output.losses["mse_loss"] / (x - x.mean(0)).pow(2).sum(-1).mean()
        curve.append([step_input.n_training_steps, round(output.losses["mse_loss"].item(), 6),
                      round(fvu.item(), 6)])
        return output

    runner.sae.training_forward_pass = recorded
    start_tokens = int(ckpt.name) if ckpt else 0
    t0 = time.perf_counter()
    with _environment(WANDB_MODE=run_cfg.tracking.mode, WANDB_DIR=str(out), WANDB_SILENT="true"):
        runner.run()
    wall = time.perf_counter() - t0
    trained = tcfg.training_tokens - start_tokens
    sae_s = max(wall - gen.seconds - evals.seconds, 1e-9)
    info = {
        "model": identity.to_dict(), "layer": layer, "hook": hook, "architecture": tcfg.architecture,
        "width": tcfg.width, "k": tcfg.k, "config": asdict(tcfg),
        "command": " ".join(sys.argv), "corpus": run_cfg.corpus.path or "shipped",
        "data": {"n_texts": data.n_texts, "texts_per_kind": data.texts_per_kind,
                 "tokens_per_epoch": data.tokens_per_epoch, "epochs_packed": data.epochs,
                 "epochs_trained": round(tcfg.training_tokens / data.tokens_per_epoch, 2),
                 "contexts": len(data.contexts), "sha256": data.sha256},
        "training_tokens": tcfg.training_tokens, "resumed_from_tokens": start_tokens,
        "tokens_this_session": trained, "wall_s": round(wall, 1),
        "tokens_per_s": round(trained / wall, 1),
        "activation_generation": {"seconds": round(gen.seconds, 1), "positions": gen.tokens,
                                  "positions_per_s": round(gen.tokens / max(gen.seconds, 1e-9), 1)},
        "sae_update": {"seconds": round(sae_s, 1), "tokens_per_s": round(trained / sae_s, 1)},
        "in_training_evals_s": round(evals.seconds, 1),
        "bound_by": "activation generation" if gen.seconds > sae_s else "SAE update",
        "final_mse": curve[-1][1] if curve else None,
        "final_fvu": curve[-1][2] if curve else None,
        "loss_curve": [c for i, c in enumerate(curve) if i % 10 == 0 or i == len(curve) - 1],
        "versions": _versions(),
    }
    write_json(partial / "train_info.json", info)
    partial.replace(final)
    log.info("SAE trained: %s (%d tokens in %.0f s)", final, trained, wall)
    return TrainResult(final, info)


def evaluate_run_sae(run_cfg: RunConfig, sae_path: str | Path | None = None,
                     model: HookedTransformer | None = None, save_to: str | Path | None = None) -> Any:
    """Evaluate the run config's SAE (or the one at `sae_path`) on the held-out corpus split.

    Example:
        >>> evals = evaluate_run_sae(load_config("configs/smollm2-135m.yaml"))
        >>> evals.metrics()["sae.explained_variance"]
    """
    from .models import default_layer, load_model
    from .saes import SAEConfig, evaluate_sae, load_sae

    mcfg, ecfg, tcfg = run_cfg.model, run_cfg.sae.eval, run_cfg.sae.train
    if model is None:
        model = load_model(mcfg.name, dtype=mcfg.dtype, device=mcfg.device)
    layer = mcfg.layer if mcfg.layer is not None else default_layer(mcfg.name, model.cfg.n_layers)
    spec = SAEConfig(**{**run_cfg.sae.__dict__, "source": "local", "path": str(sae_path)}) \
        if sae_path else run_cfg.sae
    if spec.source == "train":
        out = default_out_dir(run_cfg, layer) / "sae"
        spec = SAEConfig(**{**spec.__dict__, "source": "local", "path": str(out)})
    sae = load_sae(spec, model, layer=layer)
    texts = held_out_texts(run_cfg.corpus.path, model.tokenizer, ecfg.split, tcfg.kinds,
                           tcfg.chat_fraction, tcfg.seed)
    t0 = time.perf_counter()
    evals = evaluate_sae(sae, model, texts, context_size=tcfg.context_size, config=ecfg)
    evals.extra.update(split=ecfg.split, corpus=run_cfg.corpus.path or "shipped",
                       wall_s=round(time.perf_counter() - t0, 1), inputs_key=evals_inputs_key(run_cfg))
    if save_to:
        evals.save(save_to)
    return evals


def llm_autocast(tcfg: SAETrainConfig, device: str) -> bool:
    """The config's ``llm_autocast`` with 'auto' resolved for ``device``."""
    if tcfg.llm_autocast == "auto":
        return bf16_is_fast(device)
    if not isinstance(tcfg.llm_autocast, bool):
        raise ConfigError(f"sae.train.llm_autocast: expected true, false or 'auto', got {tcfg.llm_autocast!r}")
    return tcfg.llm_autocast


def evals_inputs_key(run_cfg: RunConfig) -> str:
    """What `evaluate_run_sae` measured on, besides the SAE: the corpus file's hash, the eval
    config and how held-out texts are rendered. Evals saved beside an SAE with the same key are
    reused by `saefeatures run` instead of measured again."""
    from .corpus import DEFAULT_CORPUS
    from .models import sha256_file
    from .rundir import key_of

    tcfg = run_cfg.sae.train
    corpus = Path(run_cfg.corpus.path) if run_cfg.corpus.path else DEFAULT_CORPUS
    return key_of(sha256_file(corpus), asdict(run_cfg.sae.eval), list(tcfg.kinds), tcfg.chat_fraction,
                  tcfg.seed, tcfg.context_size)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("sae-lens", "transformer-lens", "torch", "transformers")}


def export_sae(src: str | Path, dst: str | Path, weights_dtype: str = "bfloat16") -> Path:
    """Copy a trained SAE for shipping: weights stored in `weights_dtype` (loaded back as the
    cfg's dtype, float32), cfg.json, and the training and eval records. Written atomically."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.to(getattr(torch, weights_dtype)).contiguous()
               for k, v in load_file(src / WEIGHTS_FILE).items()}
    save_file(weights, tmp / WEIGHTS_FILE)
    for name in (CFG_FILE, "train_info.json", "sparsity.safetensors", "evals.json", "README.md"):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.replace(dst)
    return dst


# ---------------------------------------------------------------- entry point (train/train_sae.py)


def main(argv: list[str] | None = None) -> TrainResult:
    """`python train/train_sae.py CONFIG [--out DIR] [--tokens N] [--no-resume]` (GPU-ready)."""
    from .config import load_config

    p = argparse.ArgumentParser(description="Train an SAE at the config's layer with SAELens.")
    p.add_argument("config", help="run config YAML (model, corpus, tracking, sae.train)")
    p.add_argument("--out", help="output directory (default: sae.train.out or runs/sae/<model>-L<layer>)")
    p.add_argument("--tokens", type=int, help="override sae.train.training_tokens")
    p.add_argument("--device", help="override model.device (e.g. cuda)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    p.add_argument("--ship", help="also export the trained SAE here (bfloat16 weights)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    if args.tokens:
        cfg.sae.train.training_tokens = args.tokens
    if args.device:
        cfg.model.device = args.device
    result = train_sae(cfg, out_dir=args.out, resume=not args.no_resume)
    if args.ship:
        export_sae(result.sae_dir, args.ship)
    print(json.dumps({k: v for k, v in result.info.items() if k != "loss_curve"}, indent=2, default=str))
    return result
