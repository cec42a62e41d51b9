"""A passkey prompt of 16k+ tokens whose KV cache costs a few hundred tokens of compute.

A full 16k prefill of SmolLM2 takes minutes on a 2-core CPU, and far longer through the torch
references of the sparse kernels. Passkey filler is one sentence repeated, so after a few
repeats the model's keys and values for it settle into a steady period. The cache is built as:
    head   intro + needle + a little filler, run by the model at positions 0.. (exact);
    body   one steady-state filler period (taken after ~500 tokens of filler context), copied
           to every later period, each copy's keys re-rotated to its own positions (RoPE
           rotations compose, ``rope_delta_ref.rotate_by_delta``);
    tail   the question, run by the model (dense or through the op) against that cache.
What the test depends on is exact: key positions run 0..S_K-1, so the question sees the needle
more than the trained window away, and the keys are rotated exactly as a transformers cache holds
them. Only the body's hidden states are approximated (a period's in-context states, repeated).
"""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from ihip_compile.eval.data import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION
from ihip_compile.kernels.rope_delta_ref import ROPE_ROTATE_HALF, rotate_by_delta
from ihip_compile.layer_calibration import model_rope

WARMUP_PERIODS = 20


@torch.no_grad()
def tiled_passkey_cache(model, tokenizer, total_tokens: int, seed: int):
    """(cache holding S_K ~ total_tokens keys, question ids [1, T], key string)."""
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    key = str(random.Random(seed).randint(10000, 99999))
    filler = ids(PASSKEY_FILLER)
    head = ids(PASSKEY_INTRO) + filler * 2 + ids(
        f"The pass key is {key}. Remember it. {key} is the pass key. ") + filler * 2
    question = ids(PASSKEY_QUESTION)
    period = len(filler)
    copies = (total_tokens - len(head) - len(question)) // period
    if copies <= WARMUP_PERIODS:
        raise ValueError(f"total_tokens {total_tokens} leaves no room for tiled filler")
    head_cache = model(torch.tensor([head]), use_cache=True).past_key_values
    warm = model(torch.tensor([ids(PASSKEY_INTRO) + filler * WARMUP_PERIODS]),
                 use_cache=True).past_key_values
    inv_freq, rotary_dim, layout = model_rope(model)
    assert layout == ROPE_ROTATE_HALF
    steady_at = warm.get_seq_length() - period  # position of the steady period's first token
    # every copy's first position, relative to the steady period's: [copies]
    shifts = len(head) + period * torch.arange(copies) - steady_at
    cache = DynamicCache()
    for layer in range(len(head_cache.layers)):
        k_period = warm.layers[layer].keys[:, :, -period:]  # [1, H_KV, P, D]
        v_period = warm.layers[layer].values[:, :, -period:]
        k_body = rotate_by_delta(
            k_period.unsqueeze(2).expand(-1, -1, copies, -1, -1),
            shifts[None, None, :, None], inv_freq, rotary_dim, layout,
        ).flatten(2, 3)  # [1, H_KV, copies * P, D]
        v_body = v_period.repeat(1, 1, copies, 1)
        cache.update(
            torch.cat([head_cache.layers[layer].keys, k_body], 2),
            torch.cat([head_cache.layers[layer].values, v_body], 2), layer,
        )
    return cache, torch.tensor([question]), key
