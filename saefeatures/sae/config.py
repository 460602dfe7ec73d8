"""What SAE the study reads, how one is trained and how it is evaluated: plain dataclasses, no imports
of the package, so the run config composes them without loading SAELens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu", "gated")
SOURCES = ("local", "pretrained", "train")


@dataclass
class SAETrainConfig:
    """How `saefeatures sae train` trains an SAE with SAELens' LanguageModelSAETrainingRunner."""

    architecture: str = "topk"
    """SAELens training architecture: 'topk', 'batchtopk', 'standard', 'jumprelu' or 'gated'."""
    width: int = 4608
    """Number of latents (d_sae); 4608 is 8x the embedded model's d_model."""
    k: float = 32
    """Active latents per token (topk); average per token over a batch (batchtopk)."""
    sparsity_coefficient: float = 5.0
    """L1 (standard, gated) or L0 (jumprelu) penalty; unused by topk and batchtopk."""
    aux_loss_coefficient: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (topk, batchtopk)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra fields of the SAELens training-SAE config (e.g. jumprelu_bandwidth, target_l0)."""
    normalize_activations: str = "expected_average_only_in"
    """SAELens input scaling (to norm sqrt(d_in)), folded into the weights after training."""
    training_tokens: int = 2_500_000
    """Token positions trained on (special tokens excluded); more than the corpus means epochs."""
    context_size: int = 256
    """Tokens per packed training context (the first is a special token, never trained on)."""
    skip_positions: int = 2
    """Leading positions of each context never trained on (SAELens seqpos_slice): the start token,
    and the next, which is a second attention sink (norm ~100x) when a context starts mid-text."""
    train_batch_size_tokens: int = 1024
    """SAE batch size in token positions."""
    store_batch_size_prompts: int = 16
    """Contexts per model forward pass when generating activations."""
    n_batches_in_buffer: int = 64
    """Mixing buffer size in units of context_size tokens (must be >= the SAE batch)."""
    lr: float = 8e-4
    """Adam learning rate."""
    lr_warm_up_steps: int = 100
    """Linear warm-up steps."""
    lr_decay_fraction: float = 0.2
    """Fraction of steps, at the end, over which the learning rate decays linearly to 0."""
    dead_feature_window: int = 100
    """Steps without firing after which a latent counts as dead (and joins the AuxK loss)."""
    n_batches_for_norm_estimate: int = 20
    """SAE batches used to estimate the input scaling factor."""
    llm_autocast: bool | str = "auto"
    """Run the model in bfloat16 autocast while generating activations: true, false, or 'auto'
    (where the hardware has bf16 units: faster there, much slower on CPUs without them)."""
    kinds: list[str] = field(default_factory=lambda: ["story", "dialogue", "neutral", "general"])
    """Corpus kinds in the training mix ('general' is model-written text on diverse prompts)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Corpus splits trained on; the 'test' split stays held out for `sae eval`."""
    chat_fraction: float = 0.5
    """Fraction of texts wrapped in the chat template (prompt as user, text as assistant)."""
    n_checkpoints: int = 4
    """Checkpoints written during training (a rerun resumes from the latest)."""
    wandb_log_frequency: int = 20
    """Steps between wandb logs."""
    eval_every_n_wandb_logs: int = 50
    """wandb logs between SAELens' in-training evals (CE loss; costly on CPU)."""
    seed: int = 0
    """Seed of the text mix, packing and SAE initialisation."""
    out: str | None = None
    """Output directory; None: runs/sae/<model>-L<layer>."""


@dataclass
class SAEEvalConfig:
    """How `evaluate_sae` measures an SAE on held-out text."""

    split: str = "test"
    """Corpus split evaluated on (never trained on by default)."""
    max_tokens: int = 65536
    """Token positions for explained variance, L0 and dead/dense latents."""
    ce_tokens: int = 16384
    """Token positions for the cross-entropy loss recovered (3-4 forward passes each)."""
    batch_size: int = 8
    """Contexts per forward pass."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""


@dataclass
class SAEConfig:
    """Which SAE reads the studied layer: a local directory, a pretrained release, or trained here."""

    source: str = "local"
    """'local' (a SAELens directory), 'pretrained' (release/sae_id, hub) or 'train'."""
    path: str | None = None
    """Local SAELens directory; None: the SAE shipped for the model and layer."""
    release: str | None = None
    """SAELens pretrained release, e.g. 'gemma-scope-2b-pt-res-canonical'."""
    sae_id: str | None = None
    """SAE id inside the release, e.g. 'layer_12/width_16k/canonical'."""
    hook: str | None = None
    """TransformerLens hook the SAE reads; None: blocks.<layer>.hook_resid_post."""
    device: str | None = None
    """Device of the SAE; None: the model's device."""
    dtype: str = "float32"
    """dtype the SAE computes in."""
    train: SAETrainConfig = field(default_factory=SAETrainConfig)
    eval: SAEEvalConfig = field(default_factory=SAEEvalConfig)
