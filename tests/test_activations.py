from dataclasses import dataclass

import pytest
import torch

from saefeatures.activations import (ActivationConfig, PooledActivations, collect_pooled, fast_twin, forward_hooks,
                                     iter_batches)
from saefeatures.dtype_copies import DTYPE_COPIES_ATTR, with_dtype
from saefeatures.errors import UserError

TEXTS = ["The kettle boiled while she read the letter twice.",
         "He parked the car, checked the mirror and walked to the office door without a word.",
         "Rain.",
         "They counted the boxes in the garage: twelve of books, three of plates, one of old photographs."]


@dataclass(frozen=True)
class Rec:
    id: str
    text: str


RECS = [Rec(f"r{i}", t) for i, t in enumerate(TEXTS)]
HOOK = "blocks.6.hook_resid_post"


def _hand_pool(model, text, skip_first=0):
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    _, cache = model.run_with_cache(ids, names_filter=HOOK)
    return cache[HOOK][0, 1 + skip_first:].mean(0)


def test_pooling_excludes_first_token_and_padding(model):
    cfg = ActivationConfig(dtype="float32", batch_tokens=4096)
    acts = collect_pooled(model, RECS, cfg, layers=[6])
    assert acts.ids == [r.id for r in RECS]
    for i, r in enumerate(RECS[:2] + RECS[3:]):
        row = acts.ids.index(r.id)
        torch.testing.assert_close(acts[HOOK][row], _hand_pool(model, r.text), atol=2e-4, rtol=1e-4)
    skip = collect_pooled(model, RECS[:1], ActivationConfig(dtype="float32", skip_first=3), layers=[6])
    torch.testing.assert_close(skip[HOOK][0], _hand_pool(model, TEXTS[0], skip_first=3), atol=2e-4, rtol=1e-4)


def test_skipping_tokens_keeps_the_second_half_of_short_records(tokenizer):
    texts = [" ".join(["word"] * 40), "Rain fell all night."]
    batch = next(iter_batches(tokenizer, ["long", "short"], texts, 4096, 256))
    mask = batch.content_mask(skip_first=10)
    for row, n in enumerate(batch.lengths.tolist()):
        start = 11 if n >= 22 else n // 2
        assert mask[row].nonzero().flatten().tolist() == list(range(start, n)), (row, n)


def test_fast_forward_matches_transformer_lens_and_yields_to_its_hooks(model):
    batch = next(iter_batches(model.tokenizer, ["a", "b"], TEXTS[:2], 4096, 256))
    names = [HOOK, "blocks.9.hook_resid_post"]
    assert fast_twin(model, names) is not None
    fast = forward_hooks(model, batch.tokens, names)
    _, cache = model.run_with_cache(batch.tokens, names_filter=names)
    for n in names:  # the attention sink (position 0) is left out, as everywhere
        torch.testing.assert_close(fast[n][:, 1:], cache[n][:, 1:], atol=2e-4, rtol=1e-4)
    assert fast_twin(model, ["blocks.6.attn.hook_pattern"]) is None  # not addressable on the HF model
    with model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", lambda act, hook: act + 1.0)]):
        assert fast_twin(model, names) is None  # a TransformerLens intervention must apply
        bumped = forward_hooks(model, batch.tokens, [HOOK])[HOOK]
    assert (bumped - fast[HOOK])[:, 1:].abs().max() > 0.1


def test_length_bucketing_respects_budget(tokenizer):
    texts = [" ".join(["word"] * n) for n in (3, 50, 7, 49, 20, 21)]
    batches = list(iter_batches(tokenizer, [str(i) for i in range(6)], texts, batch_tokens=64, max_tokens=256))
    assert sorted(i for b in batches for i in b.ids) == [str(i) for i in range(6)]
    for b in batches:
        assert b.tokens.numel() <= max(64, b.tokens.shape[1])
        mask = b.content_mask()
        assert not mask[:, 0].any()
        assert (mask.sum(1) == b.lengths - 1).all()


def test_bfloat16_copy_is_close_and_leaves_the_model_alone(model):
    dtype_before = next(model.parameters()).dtype
    bf = with_dtype(model, "bfloat16")
    assert next(bf.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == dtype_before
    assert bf.cfg.dtype == torch.bfloat16 and model.cfg.dtype == dtype_before  # issue 13: cfg was shared
    a = collect_pooled(model, RECS, ActivationConfig(dtype="float32"), layers=[6])[HOOK]
    b = collect_pooled(model, RECS, ActivationConfig(dtype="bfloat16"), layers=[6])[HOOK]
    assert ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.05


def test_bfloat16_copy_is_built_once_and_again_after_the_weights_change(tiny_model, capsys):
    """Repeated reads reuse one cast copy (and print nothing); an in-place weight update rebuilds it."""
    try:
        first = with_dtype(tiny_model, "bfloat16")
        collect_pooled(tiny_model, RECS[:2], ActivationConfig(dtype="bfloat16"), layers=[1])
        assert with_dtype(tiny_model, "bfloat16") is first
        with torch.no_grad():
            next(tiny_model.parameters()).add_(0.0)  # an in-place update, as training would make
        assert with_dtype(tiny_model, "bfloat16") is not first
        assert capsys.readouterr().out == ""
    finally:
        vars(tiny_model).pop(DTYPE_COPIES_ATTR, None)


def test_a_text_of_one_token_is_a_clear_error_before_any_forward_pass(model, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the short text was found")

    monkeypatch.setattr("saefeatures.activations.forward_hooks", no_forward)
    recs = [*RECS, Rec("r9", "Hello")]
    with pytest.raises(UserError, match=r"1 text\(s\) of fewer than 2 tokens: r9 \('Hello'\)\. Pooling leaves out"):
        collect_pooled(model, recs, ActivationConfig(dtype="float32"), layers=[6])


def test_resume_after_interruption(model, tmp_path, monkeypatch):
    cfg = ActivationConfig(dtype="float32", shard_records=2)
    out = tmp_path / "acts"
    full = collect_pooled(model, RECS, cfg, layers=[6])
    import saefeatures.activations as A

    real = A.forward_hooks
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "forward_hooks", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_pooled(model, RECS, cfg, out, layers=[6])
    monkeypatch.setattr(A, "forward_hooks", real)
    assert len(list(out.glob("shard-*.safetensors"))) == 1
    resumed = collect_pooled(model, RECS, cfg, out, layers=[6])
    assert resumed.ids == full.ids
    torch.testing.assert_close(resumed[HOOK], full[HOOK], atol=1e-4, rtol=1e-4)  # other batch shapes
    assert PooledActivations.load(out).acts[HOOK].shape == (4, 576)
    with pytest.raises(ValueError, match="was collected with"):
        collect_pooled(model, RECS, ActivationConfig(dtype="bfloat16", shard_records=2), out, layers=[6])


def _counting(monkeypatch):
    import saefeatures.activations as A

    pooled, real = [], A.forward_hooks
    monkeypatch.setattr(A, "forward_hooks",
                        lambda m, tokens, names: pooled.append(len(tokens)) or real(m, tokens, names))
    return pooled


def test_changed_text_under_the_same_id_is_pooled_again(model, tmp_path, monkeypatch):
    cfg = ActivationConfig(dtype="float32", shard_records=2)
    out = tmp_path / "acts"
    collect_pooled(model, RECS, cfg, out, layers=[6])
    edited = [RECS[0], Rec("r1", "She laughed, then locked the door and sat down in the dark."), *RECS[2:]]
    counted = _counting(monkeypatch)
    acts = collect_pooled(model, edited, cfg, out, layers=[6])
    assert sum(counted) == 1  # only the edited record
    fresh = collect_pooled(model, edited, cfg, layers=[6])
    torch.testing.assert_close(acts[HOOK], fresh[HOOK], atol=1e-4, rtol=1e-4)
    counted.clear()
    again = collect_pooled(model, RECS, cfg, out, layers=[6])  # back to the original text: its row is still there
    assert sum(counted) == 0 and not torch.allclose(again[HOOK][1], acts[HOOK][1])


def test_truncated_shard_is_named_and_its_rows_recomputed(model, tmp_path, monkeypatch, caplog):
    cfg = ActivationConfig(dtype="float32", shard_records=2)
    out = tmp_path / "acts"
    full = collect_pooled(model, RECS, cfg, out, layers=[6])
    shard = out / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    counted = _counting(monkeypatch)
    acts = collect_pooled(model, RECS, cfg, out, layers=[6])
    assert f"{shard} is corrupt" in caplog.text and sum(counted) == 2
    torch.testing.assert_close(acts[HOOK], full[HOOK], atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.safetensors", "shard-00002.safetensors"]


def test_layer_out_of_range_and_missing_hook(model):
    with pytest.raises(ValueError, match="Layer 31 is out of range"):
        collect_pooled(model, RECS, ActivationConfig(), layers=[31])
    acts = collect_pooled(model, RECS[:1], ActivationConfig(dtype="float32"), layers=[6])
    with pytest.raises(KeyError, match="No activations for blocks.7"):
        acts["blocks.7.hook_resid_post"]
