from pathlib import Path

import pytest

from saefeatures.study.config import ConfigError, RunConfig, load_config


def test_default_config_loads_typed():
    cfg = load_config("configs/smollm2-135m.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.model.layer == 18
    assert cfg.corpus.build.generation.top_p == 0.95
    assert cfg.corpus.build.split_fractions == pytest.approx((2 / 3, 5 / 6))


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  nmae: x\n", "Unknown config key\\(s\\) in model: nmae"),
        ("model:\n  layer: twenty\n", "model.layer: expected int or NoneType|model.layer: expected int"),
        ("corpus:\n  build:\n    generation:\n      top_p: high\n", "corpus.build.generation.top_p: expected float"),
        ("corpus:\n  build:\n    emotions: calm\n", "corpus.build.emotions: expected a list"),
        ("bogus: 1\n", "Unknown config key\\(s\\): bogus"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_int_is_accepted_for_float_but_bool_is_not_int(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  build:\n    generation:\n      temperature: 1\n")
    assert load_config(path).corpus.build.generation.temperature == 1.0
    path.write_text("model:\n  layer: true\n")
    with pytest.raises(ConfigError, match="model.layer"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=str)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.activations.max_tokens >= 2 and cfg.scoring.split == "train"


@pytest.mark.parametrize("key", ["skip_first", "max_tokens", "dtype", "batch_tokens"])
def test_pooling_keys_under_scoring_point_to_activations(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"scoring:\n  {key}: 16\n  split: train\n")
    with pytest.raises(ConfigError, match=rf"scoring\.{key} moved to activations\.{key}"):
        load_config(path)
