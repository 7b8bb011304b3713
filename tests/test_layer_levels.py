"""The one check that per-layer levels (a prune allocation, a search's start) fit the model they are applied to."""

from __future__ import annotations

import pytest

from lmcompress.checkpoint.allocation import check_layer_levels
from lmcompress.errors import UserError

LAYERS = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "down_proj")]


def test_levels_naming_exactly_the_layers_pass():
    check_layer_levels(LAYERS, {name: 0.5 for name in reversed(LAYERS)})


def test_missing_and_unknown_layers_are_named_and_counted():
    given = {name: 0.5 for name in LAYERS[1:]} | {"model.layers.9.mlp.up_proj": 0.5, "lm_head": 0.5}
    with pytest.raises(UserError) as info:
        check_layer_levels(LAYERS, given, "sparsity", what="allocation", hint=", with the same include_head setting")
    message = str(info.value)
    assert "allocation file's per-layer sparsities do not fit this model" in message
    assert f"1 of the model's layers have no sparsity ({LAYERS[0]})" in message
    assert "2 names are not layers this run prunes (lm_head, model.layers.9.mlp.up_proj)" in message
    assert message.endswith("with the same include_head setting") and info.value.param == "allocation"


def test_bit_width_levels_say_so_and_long_lists_are_cut():
    with pytest.raises(UserError) as info:
        check_layer_levels(LAYERS, {}, "bits", what="start")
    message = str(info.value)
    assert "start file's per-layer bit widths" in message and "6 of the model's layers have no bit width" in message
    assert "and 3 more" in message and info.value.param == "start"
