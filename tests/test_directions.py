import pytest
import torch

from saefeatures.activations import ActivationConfig, collect_pooled
from saefeatures.directions import (DEFAULT_POOLING, DirectionConfig, EmotionDirections, build_dense, neutral_basis,
                                    neutral_sample, project_out)
from saefeatures.errors import UserError


def _synthetic(n_per=20, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["happy", "sad", "calm", "afraid"]
    centers = torch.randn(len(names), d, generator=g) * 3
    nuisance = torch.zeros(d)
    nuisance[0] = 1.0  # a high-variance confound shared by everything
    acts, labels = [], []
    for i, n in enumerate(names):
        for _ in range(n_per):
            acts.append(centers[i] + torch.randn(d, generator=g) + torch.randn(1, generator=g) * 20 * nuisance)
            labels.append(n)
    neutral = torch.randn(200, d, generator=g) + torch.randn(200, 1, generator=g) * 20 * nuisance
    return torch.stack(acts), labels, neutral, centers, names


def test_neutral_projection_removes_the_neutral_subspace():
    _, _, neutral, _, _ = _synthetic()
    basis = neutral_basis(neutral, 0.5)
    assert basis.shape[0] >= 1
    assert abs(basis[0, 0]) > 0.99  # the planted confound is the top neutral PC
    x = torch.randn(10, 32)
    removed = project_out(x, basis)
    assert (removed @ basis.T).abs().max() < 1e-5
    torch.testing.assert_close(project_out(removed, basis), removed)


def test_dense_recipe_matches_hand_computation():
    acts, labels, neutral, _, names = _synthetic()
    dirs = build_dense(acts, labels, neutral, layer=3, cfg=DirectionConfig(neutral_variance=0.5))
    assert dirs.names == ["afraid", "calm", "happy", "sad"]  # paper order
    means = torch.stack([acts[[i for i, l in enumerate(labels) if l == n]].mean(0) for n in dirs.names])
    basis = neutral_basis(neutral, 0.5)
    expected = project_out(means - means.mean(0), basis)
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(dirs.vectors, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dirs.vectors.norm(dim=1), torch.ones(4))
    assert (dirs.vectors @ basis.T).abs().max() < 1e-5
    assert dirs.metadata["neutral_pcs"] == basis.shape[0]
    # each class projects highest on its own direction
    scores = dirs.project(acts)
    pred = [dirs.names[i] for i in scores.argmax(1)]
    assert sum(p == l for p, l in zip(pred, labels)) / len(labels) > 0.95


def test_concept_sentences_add_their_direction_to_the_story_direction():
    acts, labels, neutral, centers, names = _synthetic()
    stories = build_dense(acts, labels, neutral, layer=3, cfg=DirectionConfig(concept_weight=0))
    g = torch.Generator().manual_seed(1)
    concept = torch.randn(len(names), 32, generator=g) * 3  # where the sentences naming each emotion sit
    c_labels = [n for n in names[:3] for _ in range(10)]  # 'afraid' has no sentences
    c_acts = torch.stack([concept[names.index(n)] + 0.1 * torch.randn(32, generator=g) for n in c_labels])
    off = build_dense(acts, labels, neutral, layer=3, cfg=DirectionConfig(concept_weight=0), concepts=(c_acts, c_labels))
    torch.testing.assert_close(off.vectors, stories.vectors)
    assert "concept_weight" not in off.metadata
    basis = neutral_basis(neutral, 0.5)
    both = [n for n in stories.names if n != "afraid"]
    anchor = torch.stack([c_acts[[i for i, c in enumerate(c_labels) if c == n]].mean(0) for n in both])
    anchor = project_out(anchor - anchor.mean(0), basis)
    anchor = anchor / anchor.norm(dim=1, keepdim=True)
    for w in (1.0, 2.0):
        mixed = build_dense(acts, labels, neutral, layer=3, cfg=DirectionConfig(concept_weight=w),
                            concepts=(c_acts, c_labels))
        rows = [stories.index(n) for n in both]
        expected = stories.vectors[rows] + w * anchor
        torch.testing.assert_close(mixed.vectors[rows], expected / expected.norm(dim=1, keepdim=True),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed.vector("afraid"), stories.vector("afraid"))  # no sentences: stories only
        assert (mixed.vectors @ basis.T).abs().max() < 1e-4  # still orthogonal to the neutral components
        assert mixed.metadata["concept_weight"] == w and mixed.metadata["n_concepts"] == 30
        assert mixed.metadata["n_concept_emotions"] == 3
        torch.testing.assert_close(mixed.center, stories.center)  # projections stay centred on the stories
    with pytest.raises(ValueError, match="concept rows"):
        build_dense(acts, labels, neutral, layer=3, concepts=(c_acts[:5], c_labels))


def test_concept_sentences_name_their_emotion_once_per_template():
    from saefeatures.concepts import TEMPLATES, concept_sentences, templates_key

    sentences = concept_sentences(["afraid", "at ease"])
    assert len(sentences) == 2 * len(TEMPLATES) and len({s.id for s in sentences}) == len(sentences)
    assert all(s.text.count(s.emotion) == 1 and "{" not in s.text for s in sentences)
    assert sentences[0] == ("concept-afraid-00", "afraid", "I feel so afraid.")
    assert templates_key() != templates_key(TEMPLATES[1:])


def test_save_load_roundtrip(tmp_path):
    acts, labels, neutral, _, _ = _synthetic()
    dirs = build_dense(acts, labels, neutral, layer=3)
    dirs.latents = {"happy": [(5, 0.7), (9, 0.3)]}
    dirs.save(tmp_path / "d")
    back = EmotionDirections.load(tmp_path / "d")
    assert back.names == dirs.names and back.layer == 3 and back.hook == "blocks.3.hook_resid_post"
    torch.testing.assert_close(back.vectors, dirs.vectors)
    torch.testing.assert_close(back.center, dirs.center)
    assert back.latents == {"happy": [(5, 0.7), (9, 0.3)]}
    assert back.subset(["sad", "happy"]).names == ["sad", "happy"]


def test_errors():
    acts, labels, neutral, _, _ = _synthetic()
    with pytest.raises(ValueError, match="activation rows but"):
        build_dense(acts[:5], labels, neutral, layer=3)
    with pytest.raises(ValueError, match="Neutral activations have width"):
        build_dense(acts, labels, neutral[:, :8], layer=3)
    dirs = build_dense(acts, labels, neutral, layer=3)
    with pytest.raises(ValueError, match="width 8 but these directions have d_model 32"):
        dirs.project(torch.zeros(2, 8))
    with pytest.raises(KeyError, match="Did you mean"):
        dirs.vector("hapy")
    with pytest.raises(KeyError, match="not in these directions"):
        dirs.vector("proud")
    with pytest.raises(FileNotFoundError, match="directions.json"):
        EmotionDirections.load("/nonexistent")


def test_pooling_and_neutral_sample_are_saved_and_older_directories_load_with_defaults(tmp_path):
    import json

    acts, labels, neutral, _, _ = _synthetic()
    dirs = build_dense(acts, labels, neutral, layer=3, pooling=ActivationConfig(skip_first=16, max_tokens=128))
    dirs.save(tmp_path / "d")
    back = EmotionDirections.load(tmp_path / "d")
    assert back.metadata["pooling"] == {"hook": "blocks.3.hook_resid_post", "layer": 3, "max_tokens": 128,
                                        "skip_first": 16, "dtype": "auto"}
    assert (back.pooling.skip_first, back.pooling.max_tokens, back.pooling.hook) == (16, 128, "hook_resid_post")
    torch.testing.assert_close(back.neutral, neutral_sample(neutral))
    mean, std = back.calibration()
    torch.testing.assert_close(mean, back.project(back.neutral).mean(0))
    # a directory saved before pooling and the neutral sample were recorded
    meta = json.loads((tmp_path / "d" / "directions.json").read_text())["metadata"]
    del meta["pooling"]
    EmotionDirections(back.names, 3, back.vectors, center=back.center, metadata=meta).save(tmp_path / "old")
    old = EmotionDirections.load(tmp_path / "old")
    assert old.neutral is None
    assert (old.pooling.skip_first, old.pooling.max_tokens) == (DEFAULT_POOLING.skip_first, DEFAULT_POOLING.max_tokens)
    with pytest.raises(UserError, match="no neutral sample to calibrate against.*raw=True"):
        old.calibration()


def test_a_text_is_calibrated_against_neutral_text_cut_to_its_length(model):
    """read(neutral_texts=...) z-scores each text against the neutral texts cut to its own token
    length and pooled the same way (computed here by hand); texts of different lengths get their
    own calibration; too few neutral texts that long is a clear error."""
    g = torch.Generator().manual_seed(1)
    names = ["happy", "afraid", "calm"]
    vectors = torch.nn.functional.normalize(torch.randn(3, 576, generator=g), dim=1)
    pooling = {"hook": "blocks.6.hook_resid_post", "layer": 6, "max_tokens": 12, "skip_first": 3, "dtype": "float32"}
    dirs = EmotionDirections(names, 6, vectors, metadata={"pooling": pooling})
    neutral = ["The train to the airport leaves every twenty minutes from platform three on weekdays.",
               "A standard sheet of A4 paper measures 210 by 297 millimetres, about eight by twelve inches.",
               "The library opens at nine and closes at six on weekdays, and at noon on Saturdays.",
               "Water boils at one hundred degrees Celsius at sea level under normal pressure."]
    short, long_ = "The kettle boiled at last.", "She read the letter twice, then called her sister and laughed."

    def pooled(text: str, n: int) -> torch.Tensor:
        ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :n]
        _, cache = model.run_with_cache(ids, names_filter="blocks.6.hook_resid_post")
        start = min(max(n // 2, 1), 1 + 3)
        return cache["blocks.6.hook_resid_post"][0, start:n].mean(0)

    z_short, z_long = dirs.read(model, [short, long_], neutral_texts=neutral)
    for text, z in ((short, z_short), (long_, z_long)):
        n = min(12, len(model.tokenizer(text, add_special_tokens=False).input_ids))
        proj = torch.stack([dirs.project(pooled(t, n)) for t in neutral])
        mean, std = proj.mean(0), proj.std(0)
        assert [z[k] for k in names] == pytest.approx(((dirs.project(pooled(text, n)) - mean) / std).tolist(),
                                                      abs=1e-2)
    with pytest.raises(UserError, match="1 of the 2 neutral texts have 12 tokens or more"):
        dirs.read(model, [long_], neutral_texts=[neutral[0], "Rain."])


def test_reading_pools_as_the_directions_were_built_and_calibrates_against_neutral(model):
    """read() pools with the recorded skip_first/max_tokens (not ActivationConfig's defaults) and
    z-scores against the neutral sample; raw=True gives the projections."""
    g = torch.Generator().manual_seed(0)
    names = ["happy", "afraid", "calm"]
    vectors = torch.nn.functional.normalize(torch.randn(3, 576, generator=g), dim=1)
    pooling = {"hook": "blocks.6.hook_resid_post", "layer": 6, "max_tokens": 12, "skip_first": 3, "dtype": "float32"}
    dirs = EmotionDirections(names, 6, vectors, metadata={"pooling": pooling})
    text = "The kettle boiled while she read the letter twice, then she called her sister and laughed."
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :12]
    _, cache = model.run_with_cache(ids, names_filter="blocks.6.hook_resid_post")
    by_hand = dirs.project(cache["blocks.6.hook_resid_post"][0, 4:].mean(0))
    raw = dirs.read(model, [text], raw=True)[0]
    assert [raw[n] for n in names] == pytest.approx(by_hand.tolist(), abs=1e-3)
    default = dirs.project(collect_pooled(model, [type("R", (), {"id": "a", "text": text})()],
                                          ActivationConfig(dtype="float32"), layers=[6])["blocks.6.hook_resid_post"])
    assert (default - by_hand).abs().max() > 1e-2  # the defaults pool differently
    with pytest.raises(UserError, match="no neutral sample"):
        dirs.read(model, [text])
    neutral = ["The train to the airport leaves every twenty minutes from platform three.",
               "A standard sheet of A4 paper measures 210 by 297 millimetres.",
               "The library opens at nine and closes at six on weekdays."]
    calibrated = dirs.calibrated(model, neutral)
    mean, std = calibrated.calibration()
    z = calibrated.read(model, [text])[0]
    assert [z[n] for n in names] == pytest.approx(((by_hand - mean) / std).tolist(), abs=1e-2)
