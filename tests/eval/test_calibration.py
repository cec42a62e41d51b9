"""Calibration measures each layer's selection recall and picks per layer."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ihip_compile.config import IHipConfig, Stage
from ihip_compile.layer_calibration import LayerMeasurement, calibrate, choose_layers, measure_layers
from ihip_compile.layer_policy import sparse_args_for_layer

TINY = IHipConfig(dense_below_tokens=64, block_size_q=16, sink_tokens=8, sliding_window_tokens=32,
                  selected_tokens=32, stages=(Stage(16, 64), Stage(8, 32)),
                  refresh_intervals=(4, 2), wide_layers=frozenset({0}))


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_choose_layers_picks_best_style_and_widens_largest_gains():
    def measured(layer, rel, chunk, rel2, chunk2):
        recall = {("relative", 1): rel, ("chunk_indexed", 1): chunk,
                  ("relative", 2): rel2, ("chunk_indexed", 2): chunk2}
        return LayerMeasurement(layer, recall, 0.5)

    choices = choose_layers([
        measured(0, 0.5, 0.7, 0.6, 0.95),  # chunk-indexed wins; gains 0.25
        measured(1, 0.8, 0.8, 0.9, 0.99),  # tie: relative; gains 0.1
        measured(2, 0.6, 0.4, 0.9, 0.5),  # relative wins; gains 0.3
    ], wide_count=1)
    assert [(c.layer, c.pruning_rope, c.budget_factor) for c in choices] == [
        (0, "chunk_indexed", 1), (1, "relative", 1), (2, "relative", 2)]


def test_calibrate_measures_every_layer_of_a_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))
    measurements = measure_layers(model, ids, TINY, probe_blocks=2)
    assert [m.layer for m in measurements] == [0, 1, 2]
    for m in measurements:
        for style in ("relative", "chunk_indexed"):
            # A random model attends almost uniformly, so the selection keeps about its share of
            # the selectable keys (32 of ~190-220) and twice the budget about twice that.
            assert 0.05 < m.recall[(style, 1)] < 0.4
            assert m.recall[(style, 2)] > 1.5 * m.recall[(style, 1)]
    config = calibrate(model, ids, TINY, probe_blocks=2)
    assert config.layer_policy == "calibrated"
    assert sum(c.budget_factor == 2 for c in config.calibrated_layers) == len(TINY.wide_layers)
    assert model.config._attn_implementation == "sdpa"  # restored after measuring
    for layer in range(3):
        sparse_args_for_layer(config, layer)


def test_calibration_refuses_a_prompt_too_short():
    import pytest

    with pytest.raises(ValueError, match="too short"):
        measure_layers(tiny_llama(1), torch.zeros(1, 64, dtype=torch.long), TINY)
