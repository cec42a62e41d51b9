"""Per-layer op arguments: the paper policy, the calibrated one, RoPE remapping thresholds."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from ihip_compile.config import IHipConfig, LayerChoice
from ihip_compile.layer_policy import (
    PRUNING_ROPE_CHUNK_INDEXED, PRUNING_ROPE_RELATIVE, REMAP_NEVER, infer_trained_context_tokens,
    sparse_args_for_layer, with_model_facts,
)


def test_paper_policy_widens_first_layers_with_chunk_indexed_rope():
    config = IHipConfig()
    wide, normal = sparse_args_for_layer(config, 0), sparse_args_for_layer(config, 3)
    assert wide["pruning_rope"] == PRUNING_ROPE_CHUNK_INDEXED
    assert normal["pruning_rope"] == PRUNING_ROPE_RELATIVE
    assert wide["selected_tokens"] == 2 * normal["selected_tokens"] == 2 * config.selected_tokens
    assert wide["stage_keeps"] == [2 * k for k in normal["stage_keeps"]]


def test_calibrated_policy_follows_its_table():
    config = IHipConfig.from_options({
        "layer_policy": "calibrated",
        "calibrated_layers": [[0, "relative", 1], [1, "chunk_indexed", 2]],
    })
    first, second = sparse_args_for_layer(config, 0), sparse_args_for_layer(config, 1)
    assert (first["pruning_rope"], first["selected_tokens"]) == (
        PRUNING_ROPE_RELATIVE, config.selected_tokens)
    assert (second["pruning_rope"], second["selected_tokens"]) == (
        PRUNING_ROPE_CHUNK_INDEXED, 2 * config.selected_tokens)
    with pytest.raises(ValueError, match="no entry for layer 2"):
        sparse_args_for_layer(config, 2)


def test_calibrated_config_is_hashable_and_round_trips():
    config = IHipConfig(layer_policy="calibrated",
                        calibrated_layers=(LayerChoice(0, "chunk_indexed", 2),))
    assert hash(config) == hash(IHipConfig.from_options(config.as_dict()))
    assert IHipConfig.from_options(config.as_dict()) == config


@pytest.mark.parametrize("options, message", [
    ({"layer_policy": "learned"}, "layer_policy must be one of"),
    ({"layer_policy": "calibrated"}, "needs calibrated_layers"),
    ({"calibrated_layers": [[0, "relative", 1]]}, "only used with layer_policy='calibrated'"),
    ({"layer_policy": "calibrated", "calibrated_layers": [[0, "absolute", 1]]}, "pruning_rope"),
    ({"layer_policy": "calibrated", "calibrated_layers": [[0, "relative", 4]]}, "budget_factor"),
    ({"layer_policy": "calibrated", "calibrated_layers": [[1, "relative", 1]] * 2}, "twice"),
    ({"layer_policy": "calibrated", "calibrated_layers": [["x"]]}, "pruning_rope|layer"),
])
def test_bad_policy_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        IHipConfig.from_options(options)


@pytest.mark.parametrize("mode, trained, expected", [
    ("off", 8192, REMAP_NEVER), ("always", 8192, 0), ("auto", 8192, 8192), ("auto", None, 0),
])
def test_remap_threshold(mode, trained, expected):
    config = IHipConfig(rope_remap=mode, trained_context_tokens=trained)
    assert sparse_args_for_layer(config, 5)["remap_beyond_tokens"] == expected


def test_trained_context_is_inferred_from_the_model_config():
    llama31 = LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert infer_trained_context_tokens(llama31) == 131072
    assert with_model_facts(IHipConfig(), llama31).trained_context_tokens == 131072
    given = IHipConfig(trained_context_tokens=4096)
    assert with_model_facts(given, llama31) is given
    assert infer_trained_context_tokens(object()) is None
