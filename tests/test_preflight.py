"""`check_run` and friends: the shipped configs pass, and the library path (`run_study`) checks
before it loads the model too. The bad inputs themselves are in tests/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from saefeatures.study import pipeline
from saefeatures.study.config import ConfigError, load_config
from saefeatures.study.preflight import check_model, check_run, check_values

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_the_embedded_default_passes_every_check():
    check_run(load_config("configs/smollm2-135m.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_has_valid_values(path):
    cfg = load_config(path)
    cfg.model.device, cfg.sae.device = "cpu", None  # the GPU configs, checked on this CPU machine
    check_values(cfg)
    check_model(cfg)


def test_run_study_checks_before_loading_the_model(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", refuse)
    cfg = load_config("configs/smollm2-135m.yaml")
    cfg.steering.emotions = ["happy", "hapy"]
    with pytest.raises(ConfigError, match="steering.emotions: Unknown emotion 'hapy'"):
        pipeline.run_study(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
