"""The one hook-name grammar (`hook_names`), and the one flatten of nested metrics (`keys`)."""

import pytest

from saefeatures.hook_names import hook_name, layer_of, parse, resid_position, same_activation
from saefeatures.keys import flatten, key_of


def test_names_build_and_parse():
    assert hook_name(20) == "blocks.20.hook_resid_post"
    assert parse(hook_name(3, "hook_mlp_out")) == (3, "hook_mlp_out")
    assert parse("hook_embed") is None and parse("blocks.x.hook_resid_post") is None
    assert layer_of("blocks.7.hook_resid_pre") == 7
    with pytest.raises(ValueError, match="not a TransformerLens block hook"):
        layer_of("ln_final.hook_normalized")


def test_residual_positions_match_across_adjacent_blocks():
    assert resid_position("blocks.8.hook_resid_post") == resid_position("blocks.9.hook_resid_pre") == 9.0
    assert resid_position("blocks.8.hook_resid_mid") == 8.5 and resid_position("blocks.8.hook_mlp_out") is None
    assert same_activation("blocks.8.hook_resid_post", "blocks.9.hook_resid_pre")
    assert not same_activation("blocks.8.hook_resid_post", "blocks.8.hook_resid_pre")
    assert not same_activation("blocks.8.hook_mlp_out", "blocks.9.hook_mlp_out")


def test_flatten_and_keys():
    nested = {"dense": {"top1": 0.5, "by": {"x": 1}}, "n": None}
    assert flatten(nested) == {"dense.top1": 0.5, "dense.by.x": 1, "n": None}
    assert flatten(nested, "/") == {"dense/top1": 0.5, "dense/by/x": 1, "n": None}
    assert key_of(nested) == key_of({"n": None, "dense": {"by": {"x": 1}, "top1": 0.5}}) != key_of({"n": 1})
