"""Train an SAE at one hook with SAELens, offline and resumable; export it for shipping.

SAELens' `LanguageModelSAETrainingRunner` trains with the toolkit's model (``override_model``) on
the packed corpus contexts of `data.build_token_data` (``override_dataset``). Every special-token
position is excluded (SAELens' ``exclude_special_tokens``), as are the first `skip_positions`
positions of every context (SAELens' ``seqpos_slice``): when a context starts mid-text, the token
after the start token becomes a second attention sink with ~100x the usual norm. Checkpoints go
to ``OUT/checkpoints/<n_tokens>``; training again into the same directory resumes from the latest
complete one. The final SAE is written to ``OUT/sae`` atomically, with ``train_info.json``
(tokens, wall time, throughput of activation generation vs SAE update, loss curve).

Example:
    >>> records = [r for r in load_corpus() if r.split in ("train", "val")]
    >>> result = train_sae(model, records, SAETrainConfig(), "runs/sae/smollm2-L20", "blocks.20.hook_resid_post")
    >>> result.sae_dir, result.info["wall_s"]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..files import atomic_dir, write_json
from ..hook_names import layer_of
from ..models import bf16_is_fast, model_identity
from .config import ARCHITECTURES, SAETrainConfig
from .data import build_token_data, special_token_ids
from .load import CFG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..corpus import CorpusRecord

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_state.pt",
                    "activations_store_state.safetensors", "runner_cfg.json")
"""Files of a complete SAELens checkpoint (runner_cfg.json is written last)."""


@dataclass
class TrainResult:
    sae_dir: Path
    info: dict[str, Any]


def finished(out_dir: str | Path) -> TrainResult | None:
    """The SAE a finished training run wrote to ``out_dir``, or None."""
    final = Path(out_dir) / "sae"
    if not (final / "train_info.json").is_file():
        return None
    return TrainResult(final, json.loads((final / "train_info.json").read_text()))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the most training tokens, or None."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return max(done, key=lambda p: int(p.name), default=None)


def training_sae_config(cfg: SAETrainConfig, d_in: int, device: str) -> Any:
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


def train_sae(model: HookedTransformer, records: Sequence[CorpusRecord], tcfg: SAETrainConfig,
              out_dir: str | Path, hook: str, *, resume: bool = True, corpus_label: str = "shipped",
              wandb_project: str | None = None, wandb_mode: str = "offline") -> TrainResult:
    """Train (or resume, or reuse) an SAE at ``hook`` of ``model`` on ``records`` with SAELens.

    Args:
        model: the loaded HookedTransformer.
        records: training records (their kinds and splits already chosen).
        tcfg: architecture, width, batch sizes and training tokens.
        out_dir: where checkpoints and the final SAE (``out_dir/sae``) go.
        hook: the TransformerLens hook the SAE reads (blocks.L.hook_resid_post).
        resume: continue from the latest checkpoint in out_dir (False: start over).
        corpus_label: where the records came from, for the training record.
        wandb_project: log to this wandb project (None: no wandb), in ``wandb_mode``.

    Example:
        >>> result = train_sae(model, records, SAETrainConfig(training_tokens=100_000), "runs/sae/x", "blocks.20.hook_resid_post")
        >>> sae = load_sae(result.sae_dir, model, layer=20)
    """
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    layer = layer_of(hook)
    out = Path(out_dir)
    final = out / "sae"
    done = finished(out)
    if done is not None:
        log.info("SAE already trained: %s (delete it to retrain)", final)
        return done
    if tcfg.n_batches_in_buffer * tcfg.context_size < tcfg.train_batch_size_tokens:
        raise ValueError("sae.train.n_batches_in_buffer x context_size must be >= train_batch_size_tokens "
                         f"({tcfg.n_batches_in_buffer} x {tcfg.context_size} < {tcfg.train_batch_size_tokens}).")
    out.mkdir(parents=True, exist_ok=True)
    device = str(model.cfg.device)
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
    use_wandb = wandb_project is not None
    partial = out / "final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    identity = model_identity(model)
    rcfg = LanguageModelSAERunnerConfig(
        sae=training_sae_config(tcfg, model.cfg.d_model, device),
        model_name=identity.name, hook_name=hook,
        dataset_path=f"saefeatures-corpus:{corpus_label}",
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
        logger=LoggingConfig(log_to_wandb=use_wandb, wandb_project=wandb_project or "saefeatures",
                             run_name=f"sae-{identity.name.split('/')[-1]}-L{layer}-{tcfg.architecture}-{tcfg.width}",
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
    with _environment(WANDB_MODE=wandb_mode, WANDB_DIR=str(out), WANDB_SILENT="true"):
        runner.run()
    wall = time.perf_counter() - t0
    trained = tcfg.training_tokens - start_tokens
    sae_s = max(wall - gen.seconds - evals.seconds, 1e-9)
    info = {
        "model": identity.to_dict(), "layer": layer, "hook": hook, "architecture": tcfg.architecture,
        "width": tcfg.width, "k": tcfg.k, "config": asdict(tcfg),
        "command": " ".join(sys.argv), "corpus": corpus_label,
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


def llm_autocast(tcfg: SAETrainConfig, device: str) -> bool:
    """The config's ``llm_autocast`` with 'auto' resolved for ``device``."""
    if tcfg.llm_autocast == "auto":
        return bf16_is_fast(device)
    if not isinstance(tcfg.llm_autocast, bool):
        raise ConfigError(f"sae.train.llm_autocast: expected true, false or 'auto', got {tcfg.llm_autocast!r}")
    return tcfg.llm_autocast


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("sae-lens", "transformer-lens", "torch", "transformers")}


def export_sae(src: str | Path, dst: str | Path, weights_dtype: str = "bfloat16") -> Path:
    """Copy a trained SAE for shipping: weights stored in `weights_dtype` (loaded back as the
    cfg's dtype, float32), cfg.json, and the training and eval records. Written atomically."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    weights = {k: v.to(getattr(torch, weights_dtype)).contiguous()
               for k, v in load_file(src / WEIGHTS_FILE).items()}
    with atomic_dir(dst) as tmp:
        save_file(weights, tmp / WEIGHTS_FILE)
        for name in (CFG_FILE, "train_info.json", "sparsity.safetensors", "evals.json", "README.md"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return dst
