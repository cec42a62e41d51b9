"""SmolLM2 finds a pass key twice its trained window away only because RoPE is remapped.

The prompt is 16k tokens (SmolLM2 was trained on 8k); its cache is built cheaply, see
``ihip_compile.eval.tiled_passkey``. Attention goes through ``torch.ops.ihip.attention`` with
the layer policy's
arguments (transformers' attention interface, no graph capture: the passes have their own tests)
and small budgets (64 sinks, 256 window, 256 selected), so the sparse path runs at 16k keys.
With ``rope_remap="auto"`` the model answers the key; with ``"off"`` the same selection sees
distances up to 16k and the answer is not the key. If remapping regresses, the first check fails.
"""

from __future__ import annotations

import pytest

from ihip_compile.config import IHipConfig
from ihip_compile.eval.__main__ import CPU_SMALL
from ihip_compile.eval.paths import ModelRunner, greedy_answer
from ihip_compile.eval.run import answer_has_key
from ihip_compile.eval.tiled_passkey import ANSWER_TOKENS, tiled_passkey_cache
from ihip_compile.layer_policy import with_model_facts

CONTEXT_TOKENS = 16384


@pytest.mark.slow
def test_passkey_at_twice_the_trained_window_needs_remapping(smollm2):
    model, tokenizer = smollm2
    tiled = tiled_passkey_cache(model, tokenizer, CONTEXT_TOKENS, seed=0)
    cache, question, key = tiled.cache, tiled.question, tiled.key
    keys_before = cache.get_seq_length()
    assert keys_before > 2 * model.config.max_position_embeddings - 512
    answers = {}
    for remap in ("auto", "off"):
        config = with_model_facts(IHipConfig.from_options({**CPU_SMALL, "rope_remap": remap}),
                                  model)
        assert config.trained_context_tokens == 8192
        runner = ModelRunner(model, config, path="interface")
        new = greedy_answer(runner.forward("infinitehip"), question, ANSWER_TOKENS, cache=cache)
        answers[remap] = tokenizer.decode(new)
        cache.crop(keys_before)  # the same 16k keys for the next run
    assert answer_has_key(answers["auto"], key), answers
    assert not answer_has_key(answers["off"], key), answers


@pytest.mark.slow
def test_needle_in_the_middle_found_when_stage_zero_takes_exact_chunk_maxima(smollm2):
    """A needle 8k tokens from both the sinks and the window must be selected, not just kept in
    view: with every key of a stage-0 chunk probed (``first_probe_parts`` = chunk size) the
    selection finds it. (With the default 8 first probes this needle, across a chunk boundary,
    is missed: ``reports/eval/cpu_tiled_passkey.md``.)"""
    model, tokenizer = smollm2
    tiled = tiled_passkey_cache(model, tokenizer, CONTEXT_TOKENS, seed=1, needle_at=8179)
    chunk = CPU_SMALL["stages"][0][0]
    config = with_model_facts(IHipConfig.from_options({**CPU_SMALL, "first_probe_parts": chunk}),
                              model)
    runner = ModelRunner(model, config, path="interface")
    new = greedy_answer(runner.forward("infinitehip"), tiled.question, ANSWER_TOKENS,
                        cache=tiled.cache)
    assert answer_has_key(tokenizer.decode(new), tiled.key), tokenizer.decode(new)
