"""SAEs: training on the real embedded model, save/load, splicing, evals, mismatch errors, GPU configs.

A tiny TopK SAE is trained once per module at layer 3 (cheap forward passes) on EmoBank sentences
shipped with the package; no test touches the network (HF_HUB_OFFLINE is forced for the pretrained
loading paths, which are exercised with small SAEs saved to disk in the releases' format).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from saefeatures.study.config import RunConfig, load_config
from saefeatures.corpus import CorpusRecord
from saefeatures.emotions import DATA
from saefeatures.hook_names import same_activation
from saefeatures.sae import (SAEConfig, SAEEvalConfig, SAELoadError, SAEMismatchError, check_sae, evaluate_sae,
                             export_sae, load_sae, sae_info, shipped_sae_dir, spliced)
from saefeatures.sae.data import build_token_data, pack_texts, render_texts, special_token_ids
from saefeatures.sae.train import latest_checkpoint
from saefeatures.study.sae_stages import evals_inputs_key, train_run_sae

LAYER = 3
STEPS, BATCH, CONTEXT = 300, 128, 128
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _records(split: str) -> list[CorpusRecord]:
    with open(DATA / "emobank" / "emobank.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and len(r["text"].split()) >= 4]
    return [CorpusRecord(id=r["id"], emotion="general", topic="emobank", kind="general", split=split,
                         prompt="Write one sentence.", text=r["text"], model_id="emobank", seed=0)
            for r in rows]


def _tiny_cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.model.layer = LAYER
    cfg.tracking.wandb = False
    t = cfg.sae.train
    t.width, t.k, t.training_tokens = 256, 8, STEPS * BATCH
    t.train_batch_size_tokens, t.context_size, t.store_batch_size_prompts = BATCH, CONTEXT, 8
    t.n_batches_in_buffer, t.n_batches_for_norm_estimate = 8, 5
    t.lr, t.lr_warm_up_steps, t.dead_feature_window, t.n_checkpoints = 2e-3, 20, 50, 3
    return cfg


@pytest.fixture(scope="module")
def train_records():
    return _records("train")[:2000]


@pytest.fixture(scope="module")
def tiny(model, tmp_path_factory, train_records):
    """A tiny SAE trained for STEPS steps on the real model: (config, result)."""
    cfg = _tiny_cfg()
    result = train_run_sae(cfg, out_dir=tmp_path_factory.mktemp("sae") / "run", model=model,
                       records=train_records)
    return cfg, result


@pytest.fixture(scope="module")
def tiny_sae(tiny, model):
    return load_sae(tiny[1].sae_dir, model, layer=LAYER)


@pytest.fixture(scope="module")
def test_texts():
    return [r.text for r in _records("test")[:400]]


# ---------------------------------------------------------------- training


@pytest.mark.dtype  # the tiny SAE's activations come from the LM in bf16 autocast where bf16 is fast
def test_training_loss_falls_and_run_is_recorded(tiny):
    _, result = tiny
    curve = result.info["loss_curve"]  # (step, mse, fraction of variance unexplained), every 10 steps
    assert curve[-1][0] == STEPS - 1
    first = sum(c[2] for c in curve[:3]) / 3
    last = sum(c[2] for c in curve[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert result.info["final_fvu"] < 0.5
    for f in ("cfg.json", "sae_weights.safetensors", "train_info.json"):
        assert (result.sae_dir / f).is_file()
    assert not (result.sae_dir.parent / "final.partial").exists()
    checkpoints = sorted((result.sae_dir.parent / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert len(checkpoints) == 3
    assert latest_checkpoint(result.sae_dir.parent / "checkpoints") == checkpoints[-1]
    info = result.info
    assert info["activation_generation"]["positions_per_s"] > 0 and info["sae_update"]["tokens_per_s"] > 0
    assert info["hook"] == f"blocks.{LAYER}.hook_resid_post"
    meta = json.loads((result.sae_dir / "cfg.json").read_text())["metadata"]
    assert meta["seqpos_slice"] == [2, None] and meta["exclude_special_tokens"] == [0, 1, 2]


@pytest.mark.dtype
def test_finished_run_is_reused(tiny, model, train_records):
    cfg, result = tiny
    t0 = time.perf_counter()
    again = train_run_sae(cfg, out_dir=result.sae_dir.parent, model=model, records=train_records)
    assert time.perf_counter() - t0 < 10
    assert again.info == result.info


@pytest.mark.dtype
def test_interrupted_run_resumes_from_latest_checkpoint(tiny, model, train_records, tmp_path):
    cfg, result = tiny
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(result.sae_dir.parent / "checkpoints", run / "checkpoints")
    shutil.copy2(result.sae_dir.parent / "train_state.json", run / "train_state.json")
    latest = latest_checkpoint(run / "checkpoints")
    resumed = train_run_sae(cfg, out_dir=run, model=model, records=train_records)
    assert resumed.info["resumed_from_tokens"] == int(latest.name) > 0
    assert resumed.info["tokens_this_session"] == STEPS * BATCH - int(latest.name)
    assert resumed.info["loss_curve"][0][0] > 0  # the step count continued
    assert resumed.info["final_fvu"] < 0.5
    with pytest.raises(ValueError, match="training data changed"):  # another corpus: no silent resume
        shutil.rmtree(run / "sae")
        train_run_sae(cfg, out_dir=run, model=model, records=train_records[:1500])


def test_training_contexts_start_special_and_exclude_specials(model, train_records):
    tok = model.tokenizer
    cfg = _tiny_cfg().sae.train
    data = build_token_data(train_records[:300], tok, cfg, n_positions=100 * CONTEXT)
    specials = set(special_token_ids(tok))
    assert all(len(c) == CONTEXT and c[0] in specials for c in data.contexts)
    assert data.epochs == 2 and data.texts_per_kind == {"general": 300}
    per_epoch = data.tokens_per_epoch // CONTEXT
    assert data.contexts[0] != data.contexts[per_epoch]  # each epoch re-shuffled
    texts = render_texts(train_records[:200], tok, chat_fraction=0.5, seed=1)
    chat = [t for t in texts if t.startswith("<|im_start|>")]
    assert 60 < len(chat) < 140  # about half wrapped in the chat template
    packed = pack_texts(tok, chat[:5], 64)
    assert packed and all(c[0] in specials for c in packed)
    whole = pack_texts(tok, texts, 64, whole_texts=True)  # evals: no context starts mid-text
    starts = {ids[0] for ids in tok(texts, add_special_tokens=False)["input_ids"]}
    assert len(whole) > 10 and all(len(c) == 64 and c[0] in specials for c in whole)
    assert all(c[1] in starts or c[0] in starts for c in whole)


# ---------------------------------------------------------------- save, load, splice, evaluate


@pytest.mark.dtype
def test_save_and_load_give_identical_outputs(tiny_sae, model, tmp_path):
    x = torch.randn(16, model.cfg.d_model) * 20
    tiny_sae.save_model(tmp_path / "copy")
    copy = load_sae(tmp_path / "copy", model, layer=LAYER)
    assert torch.equal(copy.encode(x), tiny_sae.encode(x))
    assert torch.equal(copy(x), tiny_sae(x))
    shipped = load_sae(export_sae(tmp_path / "copy", tmp_path / "shipped"), model, layer=LAYER)
    assert shipped.W_enc.dtype == torch.float32  # bfloat16 on disk, float32 in use
    assert torch.allclose(shipped.W_dec, tiny_sae.W_dec, rtol=1e-2, atol=1e-3)


@pytest.mark.dtype
def test_splice_with_error_term_leaves_logits_unchanged(tiny_sae, model):
    tokens = model.tokenizer("She read the letter twice, then folded it and smiled out of the window.",
                             return_tensors="pt").input_ids
    clean = model(tokens)
    with spliced(model, tiny_sae) as sae:
        assert sae is tiny_sae
        kept = model(tokens)
    assert torch.allclose(kept, clean, atol=1e-3, rtol=1e-4)
    with spliced(model, tiny_sae, use_error_term=False):
        replaced = model(tokens)
    assert (replaced - clean).abs().max() > 0.1
    assert torch.equal(model(tokens), clean)  # no hook outlives the with
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.dtype
def test_evaluate_sae_on_held_out_text(tiny_sae, model, test_texts):
    evals = evaluate_sae(tiny_sae, model, test_texts, context_size=CONTEXT,
                         config=SAEEvalConfig(max_tokens=2048, ce_tokens=512, batch_size=4))
    assert 0.3 < evals.explained_variance <= 1
    assert 0 < evals.l0 <= 8
    assert 0 <= evals.dead_fraction < 1 and 0 <= evals.dense_fraction < 1
    assert evals.ce_loss_zero_ablation > evals.ce_loss_with_sae > evals.ce_loss_clean
    assert 0 < evals.ce_loss_recovered < 1
    assert abs(evals.ce_loss_recovered_with_error_term - 1) < 1e-3
    assert abs(evals.ce_loss_with_error_term - evals.ce_loss_clean) < 1e-3
    assert 0 < evals.n_tokens <= 2048 and evals.n_ce_tokens <= 512
    assert set(evals.metrics()) == {"sae.explained_variance", "sae.l0", "sae.dead_fraction",
                                    "sae.ce_loss_recovered"}
    assert all(isinstance(v, float) for v in evals.metrics().values())


# ---------------------------------------------------------------- errors


@pytest.mark.dtype
def test_hook_mismatch_is_a_clear_error(tiny, model):
    with pytest.raises(SAEMismatchError, match=r"Hook mismatch.*blocks\.3\.hook_resid_post.*blocks\.20"):
        load_sae(tiny[1].sae_dir, model, layer=20)


def test_width_mismatch_is_a_clear_error(model, tmp_path):
    path = _standin(tmp_path, "standard", d_in=768, hook=f"blocks.{LAYER}.hook_resid_post")
    with pytest.raises(SAEMismatchError, match="Width mismatch.*d_in is 768.*d_model 576"):
        load_sae(path, model, layer=LAYER)


def test_missing_or_incomplete_sae_directory_is_a_clear_error(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="No SAE directory at .*saefeatures sae train"):
        load_sae(tmp_path / "nowhere", model, layer=LAYER)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="not a SAELens SAE directory: cfg.json and "
                                           "sae_weights.safetensors missing"):
        load_sae(tmp_path / "empty", model, layer=LAYER)
    with pytest.raises(SAELoadError, match="No SAE is shipped for smollm2-135m-instruct layer 7"):
        load_sae(None, model, layer=7)


def test_resid_post_of_a_layer_is_resid_pre_of_the_next():
    assert same_activation("blocks.8.hook_resid_post", "blocks.9.hook_resid_pre")
    assert not same_activation("blocks.8.hook_resid_post", "blocks.8.hook_resid_pre")
    assert not same_activation("blocks.8.hook_mlp_out", "blocks.8.hook_resid_post")


# ---------------------------------------------------------------- the shipped default


def test_shipped_sae_is_the_configs_default(model):
    cfg = load_config(CONFIGS / "smollm2-135m.yaml")
    assert (cfg.sae.source, cfg.sae.path, cfg.model.layer) == ("local", None, 18)
    sae = load_sae(cfg.sae, model, layer=cfg.model.layer)
    assert sae.cfg.metadata.hook_name == "blocks.18.hook_resid_post"
    assert sae.cfg.d_sae == cfg.sae.train.width and sae.W_enc.dtype == torch.float32
    info = sae_info(shipped_sae_dir("smollm2-135m-instruct", 18))
    assert info["weights_bytes"] < 25_000_000
    assert info["evals"]["explained_variance"] >= 0.8 and info["evals"]["l0"] <= 64
    tokens = model.tokenizer("He slammed the door so hard the pictures rattled on the wall.",
                             return_tensors="pt").input_ids
    _, cache = model.run_with_cache(tokens, names_filter="blocks.18.hook_resid_post", stop_at_layer=19)
    x = cache["blocks.18.hook_resid_post"][0, 1:]  # position 0 is the attention sink
    fvu = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.4


def test_shipped_evals_are_reused_only_for_the_same_inputs():
    cfg = load_config(CONFIGS / "smollm2-135m.yaml")
    recorded = sae_info(shipped_sae_dir("smollm2-135m-instruct", 18))["evals"]["extra"]
    assert recorded["inputs_key"] == evals_inputs_key(cfg)  # the default run does not re-measure
    cfg.sae.eval.max_tokens //= 2
    assert evals_inputs_key(cfg) != recorded["inputs_key"]
    cfg = load_config(CONFIGS / "smollm2-135m.yaml")
    cfg.sae.train.chat_fraction = 0.0
    assert evals_inputs_key(cfg) != recorded["inputs_key"]


# ---------------------------------------------------------------- GPU configs, stand-in SAEs

GPU = {  # config -> (d_model, n_layers, SAELens architecture, dtype)
    "gpt2-small.yaml": (768, 12, "standard", "float32"),
    "gemma-2-2b.yaml": (2304, 26, "jumprelu", "float32"),
    "llama-3.1-8b.yaml": (4096, 32, "jumprelu", "bfloat16"),
}


def _standin(root: Path, architecture: str, d_in: int, hook: str, dtype: str = "float32",
             d_sae: int = 16, extra: dict | None = None) -> Path:
    """A small SAE saved by SAELens, with the cfg fields a pretrained release loads with."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
           "hook_name": hook, "hook_head_index": None, "prepend_bos": True, "context_size": 1024,
           "apply_b_dec_to_input": architecture == "standard", "normalize_activations": "none",
           **(extra or {})}
    sae = SAE.from_dict(handle_config_defaulting(cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.02)
    path = root / f"{architecture}-{d_in}"
    sae.save_model(path)
    return path


def _release_cfg(config: str, sae_cfg: SAEConfig) -> dict:
    """The cfg fields SAELens' loader gives the config's pretrained SAE (no download)."""
    from sae_lens.loading.pretrained_sae_loaders import get_gemma_2_config_from_hf
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = get_pretrained_saes_directory()[sae_cfg.release]
    assert sae_cfg.sae_id in release.saes_map, f"{sae_cfg.sae_id} is not in {sae_cfg.release}"
    folder = release.saes_map[sae_cfg.sae_id]
    if config == "gemma-2-2b.yaml":
        cfg = get_gemma_2_config_from_hf(release.repo_id, folder, device="cpu")
        return {"hook": cfg["hook_name"], "extra": {"model_name": cfg["model_name"]}}
    if config == "gpt2-small.yaml":  # the release's cfg.json names its hook by the sae_id
        return {"hook": sae_cfg.sae_id, "extra": {"model_name": "gpt2-small", "model_from_pretrained_kwargs":
                                                 release.config_overrides["model_from_pretrained_kwargs"]}}
    layer = int(folder.split("-L")[1].split("R")[0])  # Llama3_1-8B-Base-L20R-8x
    return {"hook": f"blocks.{layer}.hook_resid_post", "extra": {"model_name": release.model}}


@pytest.mark.parametrize("config", sorted(GPU))
def test_gpu_config_loading_paths_with_standin_sae(config, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(CONFIGS / config)
    d_model, n_layers, arch, dtype = GPU[config]
    assert cfg.model.device == "cuda" and cfg.sae.source == "pretrained"
    model_cfg = HookedTransformerConfig(d_model=d_model, n_layers=n_layers, n_ctx=256, d_head=64,
                                        act_fn="gelu", model_name=cfg.model.name)
    release = _release_cfg(config, cfg.sae)
    path = _standin(tmp_path, arch, d_model, release["hook"], dtype, extra=release["extra"])
    local = SAEConfig(**{**cfg.sae.__dict__, "source": "local", "path": str(path)})
    sae = load_sae(local, model_cfg, layer=cfg.model.layer)
    assert sae.cfg.architecture() == arch and sae.W_enc.dtype == getattr(torch, cfg.sae.dtype)
    check_sae(sae, model_cfg, layer=cfg.model.layer)
    wrong_width = HookedTransformerConfig(d_model=d_model + 64, n_layers=n_layers, n_ctx=256, d_head=64,
                                          act_fn="gelu", model_name=cfg.model.name)
    with pytest.raises(SAEMismatchError, match="Width mismatch"):
        load_sae(local, wrong_width, layer=cfg.model.layer)
    with pytest.raises(SAEMismatchError, match="Hook mismatch"):
        load_sae(local, model_cfg, layer=cfg.model.layer - 1)
    with pytest.raises(SAELoadError, match="Hugging Face hub.*HF_HUB_OFFLINE"):
        load_sae(cfg.sae, model_cfg, layer=cfg.model.layer)  # offline and not cached


def test_unknown_pretrained_id_is_a_clear_error():
    with pytest.raises(SAELoadError, match="not found in release"):
        load_sae(("gpt2-small-res-jb", "blocks.99.hook_resid_pre"))


@pytest.mark.dtype
def test_sae_info_reads_without_loading(tiny):
    info = sae_info(tiny[1].sae_dir)
    assert (info["d_in"], info["d_sae"], info["k"]) == (576, 256, 8)
    assert info["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    assert json.loads((tiny[1].sae_dir / "train_info.json").read_text())["width"] == 256
