"""The full backend (passes, then Inductor) on two model styles: numbers equal eager."""

from __future__ import annotations

import torch

from e2e.backend_checks import compiled_results, fp32_tolerance, max_abs_error, op_nodes
from models import tiny_gpt_fast, tiny_hf


def test_llama_left_padded_forward_through_inductor():
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        logits = torch.compile(model, backend="infinitehip")(ids, attention_mask=mask).logits
    (result,) = compiled_results()
    assert len(op_nodes(result.gm)) == model.config.num_hidden_layers
    # Positions 0-2 of sample 1 are padding whose queries see no key: compared from 3 on.
    rows = (slice(None), slice(3, None))
    assert max_abs_error(reference[rows], logits[rows]) <= fp32_tolerance(reference)
    assert max_abs_error(reference[0], logits[0]) <= fp32_tolerance(reference)


def test_gpt_fast_complex_rope_through_inductor():
    model = tiny_gpt_fast.build()
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.args.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        reference = model(ids)
        logits = torch.compile(model, backend="infinitehip")(ids)
    (result,) = compiled_results()
    assert len(op_nodes(result.gm)) == model.args.n_layers
    assert max_abs_error(reference, logits) <= fp32_tolerance(reference)
