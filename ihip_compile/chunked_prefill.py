"""Chunked prefill: feed a prompt of a million tokens and more into a KV cache, piece by piece.

transformers' ``generate()`` runs the whole prompt through the model in one forward: at 1M tokens
the activations of one layer alone ([S, hidden] and MLP [S, intermediate]) and the logits
([S, vocab], 0.5 TB in fp32 for a 128k vocabulary) do not fit. This helper feeds the prompt in
chunks through the (compiled) model, asking for the logits of the last position only
(``logits_to_keep=1``), with a progress bar. Then ``generate()`` continues from the filled cache:

    cache = OffloadedCache(model.config, max_cache_tokens=ids.shape[1] + 64)
    chunked_prefill(model, ids, cache, chunk_tokens=32768)             # all but the last token
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=64)                             # feeds the last token

The last prompt token is left out by default so that ``generate()`` has one token to feed (it
computes the first new token from it); pass ``leave_last=False`` to feed everything and get the
last token's logits back. Pass ``generate()`` the all-ones attention mask: without one it infers
a mask from ``pad_token_id``, takes prompt tokens equal to it for padding (a chat prompt's
special tokens may be), and so moves the new tokens' positions against the filled cache. Works with
any transformers ``Cache`` (``DynamicCache`` too). Batches must not be padded: every row is a
prompt of the same length.
"""

from __future__ import annotations

import torch


def chunked_prefill(model, input_ids: torch.Tensor, past_key_values, *,
                    chunk_tokens: int = 32768, leave_last: bool = True,
                    progress: bool = True) -> torch.Tensor | None:
    """Fill ``past_key_values`` with ``input_ids`` [B, S] (all but the last token by default).

    Returns the logits [B, vocab] of the last token fed (None when nothing was fed).
    """
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    start = past_key_values.get_seq_length()
    end = input_ids.shape[1] - (1 if leave_last else 0)
    if start > end:
        raise ValueError(f"the cache already holds {start} tokens, more than the {end} to feed")
    bar = _progress_bar(end - start, progress)
    logits = None
    # no_grad, not inference_mode: tensors made here (cache storage) are updated in place later
    # by generate(), which inference tensors do not allow.
    with torch.no_grad():
        for lo in range(start, end, chunk_tokens):
            hi = min(end, lo + chunk_tokens)
            # A chunk of its own (strides [hi - lo, 1]), not a view into the prompt: a compiled
            # model guards its input's strides, and a view's row stride is the prompt's length,
            # so each new prompt length recompiled the graphs (two recompiles of seconds each).
            piece = input_ids[:, lo:hi].clone(memory_format=torch.contiguous_format)
            out = model(input_ids=piece, past_key_values=past_key_values, use_cache=True,
                        logits_to_keep=1)
            logits = out.logits[:, -1]
            bar.update(hi - lo)
    bar.close()
    return logits


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="prefill", disable=not enabled)
