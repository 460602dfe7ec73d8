"""Steering mechanics on the real embedded model with a small random-weight SAELens SAE.

The SAE (TopK, 512 latents, unit decoder rows, encoder = decoder transposed) is hooked at
blocks.20.hook_resid_post; the directions are random unit vectors named like emotions. That is
enough to check the mechanics exactly: error-term equality, which latents a clamp touches, which
positions a position mode touches, and that the fast transformers path and the TransformerLens
path produce the same greedy tokens. Behaviour with real directions is in test_steering_evals.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hooks_left, make_random_sae

from saefeatures.directions import EmotionDirections
from saefeatures.emotions import UnknownEmotionError
from saefeatures.hf_hooks import HookNameError, parse_hook_name, tl_named_hooks
from saefeatures.models import hf_twin
from saefeatures.steering import (Steering, SteeringError, SteeringSpec, emotion_latent_values,
                                  generate_steered_full, parse_assignments, residual_norm,
                                  steered)

LAYER = 20
HOOK = f"blocks.{LAYER}.hook_resid_post"
PROMPTS = ["Tell me about your day.", "Describe the room you are in, please, in a few words."]


def make_sae(seed: int = 0):
    """The TopK stand-in SAE these tests steer with: 512 latents, k 16, at `HOOK`."""
    return make_random_sae(d_sae=512, hook=HOOK, seed=seed, k=16)


@pytest.fixture(scope="module")
def sae():
    return make_sae()


@pytest.fixture(scope="module")
def dirs():
    g = torch.Generator().manual_seed(1)
    names = ["happy", "afraid", "desperate", "calm"]
    vectors = torch.nn.functional.normalize(torch.randn(len(names), 576, generator=g), dim=1)
    return EmotionDirections(names, LAYER, vectors, HOOK, "dense", torch.zeros(576))


@pytest.fixture(scope="module")
def tokens(tokenizer):
    from saefeatures.steering import render_prompts

    return tokenizer(render_prompts(tokenizer, PROMPTS[:1]), return_tensors="pt", add_special_tokens=False).input_ids


def no_hooks_left(model, sae=None) -> bool:
    return not hooks_left(model, sae)


# ---------------------------------------------------------------- fast path addressing


def test_hf_hooks_read_the_same_activations_as_transformer_lens(model, tokens):
    names = [HOOK, "blocks.5.hook_resid_pre", "blocks.7.hook_attn_out", "blocks.7.hook_mlp_out"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    got = {}

    def saver(name):
        def fn(act, positions):
            got[name] = (act.clone(), positions.clone())
        return fn

    with torch.no_grad(), tl_named_hooks(hf_twin(model), [(n, saver(n)) for n in names]):
        hf_twin(model)(tokens)
    for n in names:
        act, positions = got[n]
        scale = cache[n][:, 1:].abs().max()  # leave out the attention sink's huge norm
        assert (act - cache[n])[:, 1:].abs().max() < 1e-4 * scale, n
        assert torch.equal(positions, torch.arange(tokens.shape[1]))
    assert no_hooks_left(model)


def test_unknown_hook_names_are_clear_errors(model, dirs):
    hf = hf_twin(model)
    with pytest.raises(HookNameError, match="not supported on the fast.*hook_resid_post"):
        parse_hook_name(hf, "blocks.3.hook_resid_mid")
    with pytest.raises(HookNameError, match="layer 40 does not exist.*0..29"):
        parse_hook_name(hf, "blocks.40.hook_resid_post")
    with pytest.raises(SteeringError, match="Hook 'blocks.99.hook_resid_post' does not exist.*0..29"):
        Steering.from_spec(SteeringSpec(emotions={"happy": 0.1}, hook="blocks.99.hook_resid_post"), model,
                           directions=dirs, norm=1.0)
    bad = Steering(hook="blocks.20.hook_resid_mid", vector=torch.zeros(576))
    with pytest.raises(HookNameError, match="not supported on the fast"):
        with steered(model, bad, backend="hf"):
            pass
    assert no_hooks_left(model)


# ---------------------------------------------------------------- errors at the boundary


def test_unknown_emotions_latents_and_options_are_clear_errors(model, dirs, sae):
    with pytest.raises(UnknownEmotionError, match="Unknown emotion 'hapy'.*happy"):
        Steering.from_spec(SteeringSpec(emotions={"hapy": 0.1}), model, directions=dirs, norm=1.0)
    with pytest.raises(KeyError, match="'proud' is known but not in these directions"):
        Steering.from_spec(SteeringSpec(emotions={"proud": 0.1}), model, directions=dirs, norm=1.0)
    with pytest.raises(SteeringError, match=r"Latent id\(s\) \[512\] out of range.*d_sae 512.*0..511"):
        Steering.from_spec(SteeringSpec(latents={3: 1.0, 512: 1.0}), model, sae=sae)
    with pytest.raises(SteeringError, match="needs an SAE"):
        Steering.from_spec(SteeringSpec(emotions={"happy": 0.1}, method="clamp"), model, directions=dirs)
    with pytest.raises(SteeringError, match="positions must be one of all, prompt, generated"):
        Steering.from_spec(SteeringSpec(emotions={"happy": 0.1}, positions="middle"), model, directions=dirs)
    with pytest.raises(SteeringError, match="names no emotion and no latent"):
        SteeringSpec().validate()
    with pytest.raises(SteeringError, match="needs the prompt length"):
        s = Steering.from_spec(SteeringSpec(emotions={"happy": 0.1}, positions="prompt"), model,
                               directions=dirs, norm=1.0)
        with steered(model, s, backend="hf"):
            hf_twin(model)(torch.tensor([[1, 2, 3]]))
    with pytest.raises(SteeringError, match="not NAME=VALUE"):
        parse_assignments(["desperate"])
    assert parse_assignments(["desperate=0.5", "calm=-0.2"]) == {"desperate": 0.5, "calm": -0.2}
    assert parse_assignments(["12=3"], int) == {12: 3.0}
    assert no_hooks_left(model, sae)


# ---------------------------------------------------------------- strengths


def test_residual_norm_leaves_out_the_sink_and_scales_directions(model, dirs):
    norm = residual_norm(model, HOOK)
    assert residual_norm(model, HOOK) == norm  # cached
    ids = model.tokenizer("The bus leaves every fifteen minutes.", return_tensors="pt").input_ids
    _, cache = model.run_with_cache(ids, names_filter=HOOK)
    sink = cache[HOOK][0, 0].norm()
    assert 20 < norm < sink / 10  # the first token's norm would dominate the mean
    s = Steering.from_spec(SteeringSpec(emotions={"happy": 0.25}), model, directions=dirs)
    assert torch.allclose(s.vector.norm(), torch.tensor(0.25 * norm), rtol=1e-5)
    mix = Steering.from_spec(SteeringSpec(emotions={"happy": 0.25, "calm": 0.25}), model, directions=dirs)
    assert torch.allclose(mix.vector[0], 0.25 * norm * (dirs.vector("happy") + dirs.vector("calm")), atol=1e-4)


def test_clamp_values_are_on_the_direction_scale(model, dirs, sae):
    values = emotion_latent_values(dirs, "happy", sae, 0.3, 200.0, op="add", k=8)
    assert len(values) == 8
    ids = torch.tensor(list(values))
    delta = torch.tensor(list(values.values())) @ sae.W_dec[ids]
    assert torch.allclose(delta.norm(), torch.tensor(60.0), rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(delta, dirs.vector("happy"), dim=0) > 0.2
    assert set(emotion_latent_values(dirs, "happy", sae, 0.5, None, op="scale").values()) == {0.5}


# ---------------------------------------------------------------- error term and exact clamps


@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_unsteered_pass_with_sae_spliced_equals_plain_logits(model, sae, tokens, backend):
    identity = Steering(hook=HOOK, sae=sae, latent_ids=torch.tensor([1, 2, 3]),
                        latent_values=torch.ones(3), op="scale")
    run = model if backend == "tl" else (lambda t: hf_twin(model)(t).logits)
    with torch.no_grad():
        plain = run(tokens)
        with steered(model, identity, backend=backend):
            spliced = run(tokens)
        clamped = Steering(hook=HOOK, sae=sae, latent_ids=torch.tensor([1, 2, 3]),
                           latent_values=torch.full((3,), 30.0), op="set")
        with steered(model, clamped, backend=backend):
            changed = run(tokens)
    assert torch.allclose(spliced, plain, atol=1e-3, rtol=1e-4), (spliced - plain).abs().max()
    assert (changed - plain).abs().max() > 0.1
    assert torch.equal(run(tokens), plain)
    assert no_hooks_left(model, sae)


@pytest.mark.parametrize("op,value", [("set", 25.0), ("add", 7.0), ("scale", 0.0)])
def test_clamp_changes_exactly_the_targeted_latents(model, sae, tokens, op, value):
    ids = torch.tensor([5, 40, 300])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        resid = cache[HOOK]
        z = sae.encode(resid)
    if op == "scale":  # make sure the scaled latents are active somewhere
        ids = z[0].sum(0).topk(3).indices
    s = Steering(hook=HOOK, sae=sae, latent_ids=ids, latent_values=torch.full((3,), value), op=op)
    seen = {}

    def grab(acts, hook):
        seen["z"] = acts.clone()

    with torch.no_grad(), steered(model, s, backend="tl"), sae.hooks(fwd_hooks=[("hook_sae_acts_post", grab)]):
        model(tokens)
    expected = {"set": torch.full_like(z[..., ids], value), "add": z[..., ids] + value,
                "scale": z[..., ids] * value}[op]
    others = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    others[ids] = False
    assert torch.allclose(seen["z"][..., ids], expected, atol=1e-4)
    assert torch.equal(seen["z"][..., others], z[..., others])
    # The fast path moves the residual by exactly the decoder rows of the edited latents. (Its own
    # residual, read before the edit, is the reference; the attention sink at position 0 has a
    # norm of ~25,000, where float32 rounding alone is ~2e-3, so it is left out.)
    out = {}

    def keep(name):
        def fn(act, positions):
            out[name] = act.clone()
        return fn

    hf = hf_twin(model)
    with torch.no_grad(), tl_named_hooks(hf, [(HOOK, keep("before"))]), steered(model, s, backend="hf"), \
            tl_named_hooks(hf, [(HOOK, keep("after"))]):
        hf(tokens)
    z_hf = sae.encode(out["before"])
    new = {"set": torch.full_like(z_hf[..., ids], value), "add": z_hf[..., ids] + value,
           "scale": z_hf[..., ids] * value}[op]
    delta = (new - z_hf[..., ids]) @ sae.W_dec[ids]
    assert torch.allclose((out["after"] - out["before"])[:, 1:], delta[:, 1:], atol=1e-3)
    assert no_hooks_left(model, sae)


# ---------------------------------------------------------------- positions


def _record_steps(model, steering, backend, prompt_len, run):
    """(positions, input, output) of the steered hook at every forward pass of ``run``."""
    before, after = [], []
    if backend == "hf":
        hf = hf_twin(model)

        def rec(store):
            def fn(act, positions):
                store.append((positions.clone(), act.clone()))
            return fn
        with tl_named_hooks(hf, [(HOOK, rec(before))]), \
                steered(model, steering, backend="hf", prompt_len=prompt_len), \
                tl_named_hooks(hf, [(HOOK, rec(after))]):
            run()
    else:
        def rec_tl(store):
            def fn(act, hook):
                store.append((None, act.clone()))
            return fn
        with model.hooks(fwd_hooks=[(HOOK, rec_tl(before))]), \
                steered(model, steering, backend="tl", prompt_len=prompt_len) as handle, \
                model.hooks(fwd_hooks=[(HOOK, rec_tl(after))]):
            positions = []

            def pos(act, hook):
                positions.append(handle.state.positions(act.shape[1]))
            with model.hooks(fwd_hooks=[(HOOK, pos)]):
                run()
        before = [(p, b) for p, (_, b) in zip(positions, before)]
    return [(p, b, a) for (p, b), (_, a) in zip(before, after)]


@pytest.mark.parametrize("backend", ["hf", "tl"])
@pytest.mark.parametrize("mode", ["prompt", "generated"])
def test_position_modes_touch_only_their_positions_while_generating(model, dirs, tokenizer, backend, mode):
    from saefeatures.steering import left_pad, render_prompts

    s = Steering.from_spec(SteeringSpec(emotions={"happy": 0.2}, positions=mode), model, directions=dirs)
    prompts = PROMPTS if backend == "hf" else PROMPTS[:1]
    enc = left_pad(tokenizer, render_prompts(tokenizer, prompts))
    p = enc.input_ids.shape[1]
    if backend == "hf":
        def run():
            hf_twin(model).generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    else:
        def run():
            model.generate(enc.input_ids, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False)
    with torch.no_grad():
        steps = _record_steps(model, s, backend, p, run)
    assert len(steps) == 4 and steps[0][0].tolist() == list(range(p))
    assert [int(st[0][0]) for st in steps[1:]] == [p, p + 1, p + 2]  # one token at a time, KV cache
    for positions, before, after in steps:
        diff = after - before
        steered_pos = positions < p if mode == "prompt" else positions >= p
        assert torch.allclose(diff[:, steered_pos], s.vector[0].expand_as(diff[:, steered_pos]), atol=1e-3)
        assert torch.equal(diff[:, ~steered_pos], torch.zeros_like(diff[:, ~steered_pos]))
    assert no_hooks_left(model)


# ---------------------------------------------------------------- fast path == reference path


@pytest.mark.parametrize("kind", ["direction", "clamp"])
def test_fast_path_and_transformer_lens_agree_under_greedy_decoding(model, dirs, sae, kind):
    if kind == "direction":
        spec = SteeringSpec(emotions={"happy": 0.3, "calm": 0.1})
    else:
        spec = SteeringSpec(emotions={"happy": 0.5}, method="clamp", positions="generated", clamp_latents=4)
    s = Steering.from_spec(spec, model, directions=dirs, sae=sae)
    kwargs = dict(max_new_tokens=10, temperature=0.0)
    fast = generate_steered_full(model, s, PROMPTS, backend="hf", batch_size=2, **kwargs)
    plain = generate_steered_full(model, None, PROMPTS, backend="hf", batch_size=2, **kwargs)
    ref = generate_steered_full(model, s, PROMPTS, backend="tl", batch_size=1, **kwargs)
    assert [g.new_ids for g in fast] == [g.new_ids for g in ref]
    assert [g.new_ids for g in fast] != [g.new_ids for g in plain]  # the steering did something
    assert no_hooks_left(model, sae)


def test_stacked_rows_match_separate_runs(model, dirs):
    s = Steering.from_spec(SteeringSpec(emotions={"afraid": 0.3}), model, directions=dirs)
    stacked = Steering.stack([None, s])
    assert stacked.n_rows == 2 and stacked.active.tolist() == [False, True]
    both = generate_steered_full(model, stacked, PROMPTS[:1] * 2, max_new_tokens=6, batch_size=2)
    alone = generate_steered_full(model, s, PROMPTS[:1], max_new_tokens=6)
    plain = generate_steered_full(model, None, PROMPTS[:1], max_new_tokens=6)
    assert both[0].new_ids == plain[0].new_ids and both[1].new_ids == alone[0].new_ids
    with pytest.raises(SteeringError, match="rows differ"):
        Steering.stack([s, Steering.from_spec(SteeringSpec(emotions={"afraid": 0.3}, positions="prompt"), model,
                                              directions=dirs)])


def test_hooks_are_removed_after_an_error_inside_the_with(model, dirs, sae):
    s = Steering.from_spec(SteeringSpec(emotions={"happy": 0.2}, method="clamp"), model, directions=dirs, sae=sae)
    for backend in ("hf", "tl"):
        with pytest.raises(RuntimeError, match="boom"), steered(model, s, backend=backend):
            raise RuntimeError("boom")
    assert no_hooks_left(model, sae)


def test_spec_round_trip_and_config(tmp_path):
    from saefeatures.study.config import ConfigError, from_dict, RunConfig

    spec = SteeringSpec(emotions={"desperate": 0.5}, latents={7: 2.0}, method="clamp", positions="generated")
    assert SteeringSpec.load(spec.save(tmp_path / "spec.json")) == spec
    cfg = from_dict(RunConfig, {"steering": {"spec": {"emotions": {"calm": 0.1}, "latents": {3: 1.5}}}})
    assert cfg.steering.spec.emotions == {"calm": 0.1} and cfg.steering.spec.latents == {3: 1.5}
    with pytest.raises(ConfigError, match="Unknown config key.*steering.spec: strength"):
        from_dict(RunConfig, {"steering": {"spec": {"strength": 1}}})


def test_cli_steer_prints_steered_and_unsteered_replies(model, dirs, tmp_path, monkeypatch, capsys):
    import json

    from saefeatures.study import commands
    from saefeatures.study.cli import main

    monkeypatch.setattr(commands, "load_model", lambda *a, **k: model)
    dirs.save(tmp_path / "dirs")
    main(["steer", "--directions", str(tmp_path / "dirs"), "--emotion", "happy=0.3", "--positions", "generated",
          "--prompt", "Tell me about your day.", "--max-new-tokens", "6"])
    out = json.loads(capsys.readouterr().out)
    assert out["spec"]["emotions"] == {"happy": 0.3} and out["spec"]["positions"] == "generated"
    (reply,) = out["replies"]
    assert reply["prompt"] == "Tell me about your day." and reply["steered"] and reply["unsteered"]
    with pytest.raises(SystemExit):  # an unknown emotion is a clean CLI error (exit 2), not a traceback
        main(["steer", "--directions", str(tmp_path / "dirs"), "--emotion", "hapy=0.3"])
