"""Several SAEs in one command: `saefeatures sae train --layers ... --widths ...` trains every
(width, layer) variant with `train_run_sae`, each into its own directory, ``OUT/L<layer>-W<width>``.

Under `torchrun` the variants are dealt to the ranks (`World.mine`): each rank trains its own, one
after another, with SAELens on its own device (``cuda:LOCAL_RANK`` when model.device is CUDA). The
ranks meet after every round of variants: a rank that failed ends the others with `RankFailure`
naming it and its variant, and every rank gets every variant's training record. A variant's SAE
does not depend on which rank trained it, or on how many ranks there were (it is seeded); finished
variants are reused and interrupted ones resume from their latest checkpoint.

Example:
    >>> variants = plan_variants(cfg, layers=[10, 20], widths=[4608, 9216])
    >>> records = train_variants(cfg, variants, init_world())
    >>> variants_summary(records)["variants"][0]["final_fvu"]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..corpus import load_corpus
from ..distributed import World
from ..errors import ConfigError
from ..models import check_layer, load_model
from ..sae import export_sae
from ..sae.train import finished
from .config import RunConfig
from .preflight import model_shape, run_layer
from .sae_stages import default_out_dir, short_model_name, train_run_sae

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("layer", "width", "architecture", "k", "training_tokens", "resumed_from_tokens", "wall_s",
                "tokens_per_s", "final_mse", "final_fvu")
"""What `variants_summary` keeps of each variant's training record, besides its directory."""


@dataclass(frozen=True)
class SAEVariant:
    """One SAE of a `sae train` command: the layer it reads, its width, where it goes."""

    layer: int | None
    """Layer read (its hook_resid_post, or sae.hook); None: the config's, known once the model loads."""
    width: int
    """Latents (d_sae)."""
    out: Path | None
    """Output directory (checkpoints, then ``sae/``); None: `default_out_dir`, once the layer is known."""
    ship: Path | None = None
    """Where to export the trained SAE (bfloat16 weights); None: nowhere."""

    @property
    def name(self) -> str:
        return f"L{self.layer}-W{self.width}" if self.layer is not None else f"W{self.width}"


def variants_dir(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """Where the variants' directories go: ``out``, else sae.train.out, else runs/sae/<model>."""
    return Path(out or cfg.sae.train.out or Path("runs/sae") / short_model_name(cfg.model.name))


def plan_variants(cfg: RunConfig, layers: list[int] | None = None, widths: list[int] | None = None,
                  out: str | Path | None = None, ship: str | Path | None = None) -> list[SAEVariant]:
    """The SAEs to train, in a fixed order. Neither ``layers`` nor ``widths``: the config's one SAE,
    into ``out`` (else `default_out_dir`) and exported to ``ship``. Otherwise every (width, layer)
    pair, widths outer (dealt round robin, each rank gets a like mix of widths), layers defaulting
    to the config's and widths to sae.train.width, each into `variants_dir`/L<layer>-W<width> (and
    ``ship``/L<layer>-W<width>). Bad layers or widths fail here, before any model loads."""
    if layers is None and widths is None:
        layer = run_layer(cfg)
        where = out or (default_out_dir(cfg, layer) if layer is not None else None)
        return [SAEVariant(layer, cfg.sae.train.width, Path(where) if where else None, Path(ship) if ship else None)]
    for w in widths or []:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"--widths {w}: a width is a positive whole number of latents (e.g. --widths 4608 9216).")
    if layers and cfg.sae.hook:
        raise ConfigError(f"sae.hook is {cfg.sae.hook}, one layer's hook, but --layers trains at each layer's "
                          "hook_resid_post: remove sae.hook from the config, or leave out --layers.")
    layers = list(dict.fromkeys(layers or [run_layer(cfg)]))
    if layers == [None]:
        raise ConfigError(f"No default layer is known for {cfg.model.name} before it loads: give --layers, or set "
                          "model.layer in the config.")
    shape = model_shape(cfg)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"--layers {layer}: a layer is a block index, 0 or more (e.g. --layers 10 20).")
        if shape is not None and layer >= shape[0]:
            raise ConfigError(f"--layers {layer}: out of range for {cfg.model.name} ({shape[0]} layers): "
                              f"use 0..{shape[0] - 1}.")
    base = variants_dir(cfg, out)
    return [SAEVariant(layer, width, base / f"L{layer}-W{width}", Path(ship) / f"L{layer}-W{width}" if ship else None)
            for width in dict.fromkeys(widths or [cfg.sae.train.width]) for layer in layers]


def variant_config(cfg: RunConfig, variant: SAEVariant, device: str) -> RunConfig:
    """The run config that trains ``variant`` on ``device``."""
    layer = cfg.model.layer if variant.layer is None else variant.layer
    return replace(cfg, model=replace(cfg.model, layer=layer, device=device),
                   sae=replace(cfg.sae, train=replace(cfg.sae.train, width=variant.width)))


def train_variants(cfg: RunConfig, variants: list[SAEVariant], world: World = World(),
                   resume: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse, or resume) every variant: this rank its `World.mine` share, on
    `World.own_device`. Returns every variant's training record (its train_info.json, without the
    loss curve, with ``sae_dir``), in the variants' order, on every rank. Each round of variants
    ends with a `World.sync`: the error of a rank that failed is raised there on every rank."""
    mine = world.mine(variants)
    device = world.own_device(cfg.model.device)
    loaded: dict[str, Any] = {}
    records = []
    for r in range(-(-len(variants) // world.size)):
        variant = mine[r] if r < len(mine) else None
        stage = f"sae train {variant.name}" if variant else "sae train"
        try:
            record = _train(cfg, variant, device, loaded, resume) if variant else None
        except Exception as e:
            world.sync(stage, error=e, timeout_s=world.wait_s)
            raise
        # round r holds variants r*size .. r*size+size-1, one per rank in rank order; idle ranks trail
        records += [p for p in world.sync(stage, payload=record, timeout_s=world.wait_s) if p is not None]
    return records


def _train(cfg: RunConfig, variant: SAEVariant, device: str, loaded: dict[str, Any], resume: bool) -> dict[str, Any]:
    if variant.out is None or finished(variant.out) is None:
        if not loaded:  # the model and the training records, once per rank, when there is training to do
            log.info("loading %s on %s", cfg.model.name, device)
            loaded["model"] = load_model(cfg.model.name, dtype=cfg.model.dtype, device=device)
            t = cfg.sae.train
            loaded["records"] = [r for r in load_corpus(cfg.corpus.path, kinds=t.kinds) if r.split in t.splits]
        if variant.layer is not None:
            check_layer(loaded["model"], variant.layer)  # a hub model's depth is known only now
        log.info("training SAE %s on %s", variant.name, device)
    result = train_run_sae(variant_config(cfg, variant, device), out_dir=variant.out, model=loaded.get("model"),
                           resume=resume, records=loaded.get("records"))
    if variant.ship is not None:
        export_sae(result.sae_dir, variant.ship)
    return {"sae_dir": str(result.sae_dir), **{k: v for k, v in result.info.items() if k != "loss_curve"}}


def variants_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per variant: its SAE directory, layer, width and final training metrics."""
    return {"variants": [{"sae_dir": r["sae_dir"], **{k: r.get(k) for k in SUMMARY_KEYS}} for r in records]}
