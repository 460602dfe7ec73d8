"""SAE quality on held-out text: SAELens' evals with the SAE spliced into the model.

Explained variance, L0, dead and dense latents, and the cross-entropy loss recovered with the SAE
spliced in (with and without its error term); special-token positions are excluded throughout.

Example:
    >>> evals = evaluate_sae(sae, model, [r.text for r in load_corpus() if r.split == "test"])
    >>> evals.explained_variance, evals.l0, evals.ce_loss_recovered
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import read_json, write_json
from .config import SAEEvalConfig
from .data import pack_texts, special_token_ids
from .load import spliced

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass
class SAEEvals:
    """SAE quality on held-out text (SAELens evals); `metrics()` gives the metrics.json keys."""

    explained_variance: float
    l0: float
    dead_fraction: float
    """Latents that never fired on the evaluated tokens."""
    dense_fraction: float
    """Latents firing on more than `dense_threshold` of the tokens."""
    ce_loss_recovered: float
    """(CE zero-ablated - CE with SAE) / (CE zero-ablated - CE clean), SAE without error term."""
    ce_loss_recovered_with_error_term: float
    """The same with the error term kept (1.0 when the splice is exact)."""
    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_with_error_term: float
    ce_loss_zero_ablation: float
    kl_div_with_sae: float
    cossim: float
    n_tokens: int
    n_ce_tokens: int
    dense_threshold: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The keys this stage fills in a run's metrics.json (dotted paths)."""
        return {f"sae.{k}": float(getattr(self, k)) for k in
                ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SAEEvals:
        return cls(**read_json(path))


def _token_store(model: HookedTransformer, sae: SAE, contexts: list[list[int]], batch: int,
                 exclude: list[int]) -> Any:
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model, dataset=Dataset.from_dict({"tokens": contexts}), streaming=False,
        hook_name=sae.cfg.metadata.hook_name, hook_head_index=None, context_size=len(contexts[0]),
        d_in=sae.cfg.d_in, n_batches_in_buffer=1, total_training_tokens=len(contexts),
        store_batch_size_prompts=batch, train_batch_size_tokens=batch, prepend_bos=False,
        normalize_activations="none", device=torch.device(str(sae.device)), dtype=sae.cfg.dtype,
        exclude_special_tokens=torch.tensor(exclude, dtype=torch.long))


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    model: HookedTransformer,
    texts: Sequence[str],
    context_size: int = 256,
    config: SAEEvalConfig | None = None,
) -> SAEEvals:
    """SAELens evals of `sae` spliced into `model` on `texts` (held-out, never trained on).

    Texts are packed into contexts that each start at a text's start (see `pack_texts`);
    special-token positions are excluded from every metric and left unreplaced when the SAE is
    spliced in.

    Example:
        >>> evals = evaluate_sae(sae, model, [r.text for r in load_corpus() if r.split == "test"])
        >>> evals.explained_variance, evals.l0, evals.ce_loss_recovered
    """
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    cfg = config or SAEEvalConfig()
    contexts = pack_texts(model.tokenizer, texts, context_size, whole_texts=True)
    batch = cfg.batch_size
    n_batches = min(len(contexts), max(1, cfg.max_tokens // context_size)) // batch
    n_ce = min(n_batches, max(1, cfg.ce_tokens // (context_size * batch)))
    if n_batches < 1:
        raise ValueError(f"Too little text to evaluate: {len(contexts)} contexts of {context_size} "
                         f"tokens, need at least {batch}. Pass more texts or a smaller batch_size.")
    exclude = special_token_ids(model.tokenizer)
    was_training = sae.training
    sae.eval()
    ce, _ = run_evals(
        sae, _token_store(model, sae, contexts, batch, exclude), model, ActivationScaler(),
        EvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=n_ce, compute_ce_loss=True,
                   compute_kl=True, n_eval_sparsity_variance_batches=1),
        exclude_special_tokens=exclude)
    sparse, features = run_evals(
        sae, _token_store(model, sae, contexts, batch, exclude), model, ActivationScaler(),
        EvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=1,
                   n_eval_sparsity_variance_batches=n_batches, compute_sparsity_metrics=True,
                   compute_l2_norms=True,
                   compute_variance_metrics=True, compute_featurewise_density_statistics=True),
        exclude_special_tokens=exclude)
    ce_err = _ce_with_error_term(sae, model, contexts[: n_ce * batch], batch, exclude)
    perf, recon = ce["model_performance_preservation"], sparse["reconstruction_quality"]
    clean, ablated = perf["ce_loss_without_sae"], perf["ce_loss_with_ablation"]
    density = torch.tensor(features["feature_density"])
    is_special = torch.isin(torch.tensor(contexts[: n_batches * batch]), torch.tensor(exclude))
    sae.train(was_training)
    return SAEEvals(
        explained_variance=recon["explained_variance"], l0=sparse["sparsity"]["l0"],
        dead_fraction=float((density == 0).float().mean()),
        dense_fraction=float((density > cfg.dense_threshold).float().mean()),
        ce_loss_recovered=perf["ce_loss_score"],
        ce_loss_recovered_with_error_term=(ablated - ce_err) / (ablated - clean),
        ce_loss_clean=clean, ce_loss_with_sae=perf["ce_loss_with_sae"], ce_loss_with_error_term=ce_err,
        ce_loss_zero_ablation=ablated, kl_div_with_sae=ce["model_behavior_preservation"]["kl_div_with_sae"],
        cossim=recon["cossim"], n_tokens=int((~is_special).sum()),
        n_ce_tokens=int((~is_special[: n_ce * batch]).sum()), dense_threshold=cfg.dense_threshold,
        extra={"mse": recon["mse"], "l2_ratio": sparse.get("shrinkage", {}).get("l2_ratio"),
               "kl_div_score": ce["model_behavior_preservation"]["kl_div_score"],
               "context_size": context_size, "n_latents": int(density.numel())},
    )


def _ce_with_error_term(sae: SAE, model: HookedTransformer, contexts: list[list[int]], batch: int,
                        exclude: list[int]) -> float:
    """Mean next-token CE with the SAE and its error term spliced in, masked as SAELens does."""
    losses = []
    with spliced(model, sae, use_error_term=True):
        for i in range(0, len(contexts), batch):
            tokens = torch.tensor(contexts[i : i + batch], device=model.cfg.device)
            loss = model(tokens, return_type="loss", loss_per_token=True)
            keep = ~torch.isin(tokens, torch.tensor(exclude, device=tokens.device))[:, :-1]
            losses.append(loss[keep])
    return torch.cat(losses).mean().item()
