"""ihip_compile.tp in one process: which plan a model gets, and the per-rank head counts."""

import pytest
import transformers

from ihip_compile.tp import (
    heads_divide, is_attention_key, local_kv_heads, tensor_parallel_size, tp_plan_for,
)
from tests.models import tiny_hf


def _llama(heads, kv_heads, head_dim=8):
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )


def test_heads_that_divide_keep_the_models_own_plan():
    assert heads_divide(_llama(32, 8), 2) and tp_plan_for(_llama(32, 8), 2) == "auto"


@pytest.mark.parametrize("heads, kv_heads, ranks", [(9, 3, 2), (32, 8, 3), (6, 3, 2)])
def test_heads_that_do_not_divide_replicate_attention_only(heads, kv_heads, ranks):
    plan = tp_plan_for(_llama(heads, kv_heads), ranks)
    assert not heads_divide(_llama(heads, kv_heads), ranks)
    assert not any("self_attn" in key for key in plan)
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
    assert plan["model.layers.*.mlp.gate_proj"] == "colwise"


def test_gpt_neox_attention_entries_are_recognised():
    config = transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=72, num_attention_heads=9, intermediate_size=96,
        num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    plan = tp_plan_for(config, 2)
    assert plan and not any(is_attention_key(key) for key in plan)
    assert "gpt_neox.layers.*.mlp.dense_4h_to_h" in plan


@pytest.mark.parametrize("name, attention", [
    ("model.layers.0.self_attn.k_proj.weight", True),
    ("gpt_neox.layers.*.attention.query_key_value", True),
    ("transformer.h.3.attn.q_proj.weight", True),
    ("model.layers.0.mlp.down_proj.weight", False),
    ("lm_head", False),
])
def test_attention_keys(name, attention):
    assert is_attention_key(name) is attention


def test_unsharded_model_reports_all_its_heads():
    model = tiny_hf.build("llama")
    assert tensor_parallel_size(model) == 1
    assert local_kv_heads(model) == model.config.num_key_value_heads


def test_rejects_a_rank_count_below_one():
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        heads_divide(_llama(4, 2), 0)
