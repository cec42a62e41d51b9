"""The op receives the right compact description: q_positions, kv_valid, model_window, RoPE.

The backend here records every ``torch.ops.ihip.attention`` call while the rewritten graph runs,
so each argument is checked against what the model itself used (cache positions, the 2-D
padding mask, its sliding window and its ``inv_freq`` buffer).
"""

from __future__ import annotations

import torch

from e2e.backend_checks import OpRecorder
from ihip_compile.backend import keep_generation_masks_in_graph
from models import tiny_gpt_fast, tiny_hf

PROMPT = 10


def _padded_inputs():
    ids = torch.randint(3, tiny_hf.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _record_generate(family: str, new_tokens: int = 3, **kwargs):
    model = tiny_hf.build(family)
    ids, mask = _padded_inputs()
    recorder = OpRecorder()
    if kwargs.get("cache_implementation") == "static":
        keep_generation_masks_in_graph(model)
    model.compile(backend=recorder)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return model, mask, recorder.calls


def _record_forward(family: str):
    model = tiny_hf.build(family)
    ids, mask = _padded_inputs()
    recorder = OpRecorder()
    with torch.no_grad():
        torch.compile(model, backend=recorder)(ids, attention_mask=mask)
    return model, recorder.calls


def test_sliding_window_padded_prefill_and_decode_inputs():
    model, mask, calls = _record_generate("mistral")
    layers = model.config.num_hidden_layers
    assert len(calls) == 3 * layers  # prefill + 2 decode steps
    inv_freq = model.model.rotary_emb.inv_freq
    for step, call in enumerate(calls):
        assert call["layer"] == step % layers
        assert call["model_window"] == tiny_hf.SLIDING_WINDOW
        assert call["rope_layout"] == 1 and call["rotary_dim"] == 16
        torch.testing.assert_close(call["inv_freq"], inv_freq, rtol=0, atol=0)
        s_k = call["k"].shape[-2]
        if step < layers:  # prefill: every key, query i is key i
            assert torch.equal(call["q_positions"], torch.arange(PROMPT))
            assert torch.equal(call["kv_valid"], mask.bool())
        else:  # decode: the sliding cache keeps the last W - 1 keys plus the new one
            assert torch.equal(call["q_positions"], torch.tensor([s_k - 1]))
            assert call["kv_valid"].shape == (2, s_k) and call["kv_valid"].all()
        assert call["k"].shape[1] == model.config.num_key_value_heads  # repeat_kv stripped


def test_static_cache_positions_and_padding():
    model, mask, calls = _record_generate("llama", cache_implementation="static")
    layers = model.config.num_hidden_layers
    max_cache = calls[0]["k"].shape[-2]
    assert max_cache > PROMPT + 1  # room for the generated tokens
    prefill, first_decode = calls[0], calls[layers]
    assert torch.equal(prefill["q_positions"], torch.arange(PROMPT))
    expected_valid = torch.zeros(2, max_cache, dtype=torch.bool)
    expected_valid[:, :PROMPT] = mask.bool()
    assert torch.equal(prefill["kv_valid"], expected_valid)
    assert torch.equal(first_decode["q_positions"], torch.tensor([PROMPT]))
    assert first_decode["kv_valid"][:, PROMPT].all()
    assert not first_decode["kv_valid"][:, PROMPT + 1 :].any()
    assert all(c["model_window"] == 0 for c in calls)


def test_partial_rotary_is_recorded():
    for family, rotary_dim in (("phi3", 8), ("gpt_neox", 4)):
        model, calls = _record_forward(family)
        assert len(calls) == model.config.num_hidden_layers
        rotary = model.base_model.rotary_emb
        for call in calls:
            assert call["rotary_dim"] == rotary_dim and call["rope_layout"] == 1
            torch.testing.assert_close(call["inv_freq"], rotary.inv_freq, rtol=0, atol=0)


def test_gemma3_local_and_global_layers_keep_their_windows():
    model, calls = _record_forward("gemma3")
    windows = {c["layer"]: c["model_window"] for c in calls}
    expected = {i: tiny_hf.SLIDING_WINDOW if kind == "sliding_attention" else 0
                for i, kind in enumerate(model.config.layer_types)}
    assert windows == expected


def test_complex_rope_frequencies_come_from_the_table():
    model = tiny_gpt_fast.build()
    recorder = OpRecorder()
    ids = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        torch.compile(model, backend=recorder)(ids)
    assert len(recorder.calls) == model.args.n_layers
    for call in recorder.calls:
        assert call["rope_layout"] == 2 and call["rotary_dim"] == model.args.head_dim
        torch.testing.assert_close(call["inv_freq"], model.inv_freq())
        assert torch.equal(call["q_positions"], torch.arange(12))
        assert call["kv_valid"] is None and call["k"].shape[1] == model.args.n_kv_heads


def test_layers_of_one_forward_share_one_padding_tensor():
    """One ``kv_valid`` per mask, not per layer: the op asks whether it hides anything (a device
    sync) once per forward (``kernels/padding_check.py``)."""
    model, calls = _record_forward("llama")
    assert len(calls) == model.config.num_hidden_layers > 1
    assert all(call["kv_valid"] is calls[0]["kv_valid"] for call in calls)
