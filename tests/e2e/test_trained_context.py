"""The backend reads the traced model's trained context, so ``rope_remap="auto"`` keeps true
RoPE positions within it on an unmodified model compiled with no options about it."""

from __future__ import annotations

import torch

from e2e.backend_checks import compiled_results, op_nodes
from models import tiny_gpt_fast, tiny_hf

# Sparse from 16 keys on, with a selection that covers every key of these prompts: sparse
# attention at true positions then equals dense, and generated tokens must match eager.
SPARSE_COVERING_ALL = {"dense_below_tokens": 16, "sink_tokens": 4, "sliding_window_tokens": 8,
                       "selected_tokens": 48, "stages": [[16, 64], [8, 48]],
                       "refresh_intervals": [3, 1]}


def _remap_beyond(result) -> set[int]:
    return {n.kwargs["remap_beyond_tokens"] for n in op_nodes(result.gm)}


def test_a_qk_norm_model_keeps_its_positions_within_its_trained_context():
    # Qwen3 normalises q and k: its larger logits make any change of position show in tokens.
    model = tiny_hf.build("qwen3")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options=SPARSE_COVERING_ALL)
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    trained = model.config.max_position_embeddings
    for result in compiled_results():
        assert result.trained_context == f"{trained} tokens (from Qwen3ForCausalLM.config)"
        assert _remap_beyond(result) == {trained}


def test_a_given_trained_context_is_kept():
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.compile(model, backend="infinitehip_eager",
                      options={"trained_context_tokens": 1024})(ids)
    (result,) = compiled_results()
    assert result.trained_context == "1024 tokens (given)"
    assert _remap_beyond(result) == {1024}


def test_a_model_without_a_config_leaves_it_unknown_and_says_so():
    model = tiny_gpt_fast.build()
    ids = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator())
    with torch.no_grad():
        torch.compile(model, backend="infinitehip_eager")(ids)
    (result,) = compiled_results()
    assert result.trained_context.startswith("unknown")
    assert "trained_context_tokens" in result.trained_context
    assert _remap_beyond(result) == {0}
