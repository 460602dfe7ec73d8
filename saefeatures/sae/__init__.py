"""Sparse autoencoders at the studied layer: load and splice, evaluate, train, score latents, measure
what they write."""

from .config import SAEConfig, SAEEvalConfig, SAETrainConfig
from .evaluate import SAEEvals, evaluate_sae
from .load import (SAELoadError, SAEMismatchError, check_sae, check_sae_files, load_sae, sae_fingerprint, sae_info,
                   shipped_sae_dir, spliced)
from .scoring import LatentScores, ScoringConfig, score_latents
from .train import TrainResult, export_sae, train_sae

__all__ = ["LatentScores", "SAEConfig", "SAEEvalConfig", "SAEEvals", "SAELoadError", "SAEMismatchError",
           "SAETrainConfig", "ScoringConfig", "TrainResult", "check_sae", "check_sae_files", "evaluate_sae",
           "export_sae", "load_sae", "sae_fingerprint", "sae_info", "score_latents", "shipped_sae_dir", "spliced",
           "train_sae"]
