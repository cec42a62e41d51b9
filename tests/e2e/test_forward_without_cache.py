"""A plain forward with ``use_cache=False`` (training/scoring style) for every tiny family.

Without an attention mask, transformers adds its packed-sequence predicate to the in-graph mask;
the backend must still rewrite every attention layer (the positions are provably consecutive),
and must leave every layer dense when the caller hands in position ids that may be packed.
"""

from __future__ import annotations

import pytest
import torch

from e2e.backend_checks import compiled_results, fp32_tolerance, max_abs_error, op_nodes
from models import tiny_hf

PAD = 3


def _batch(padded: bool):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, tiny_hf.VOCAB, (2, 12), generator=generator)
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_forward_without_cache_is_rewritten_and_matches_eager(family, padded):
    model = tiny_hf.build(family)
    ids, mask = _batch(padded)
    kwargs = {} if mask is None else {"attention_mask": mask}
    reference = _logits(model, ids, **kwargs)
    logits = _logits(torch.compile(model, backend="infinitehip_eager"), ids, **kwargs)
    results = compiled_results()
    assert results, "the backend compiled nothing"
    layers = tiny_hf.num_attention_layers(model)
    for result in results:
        assert not result.context.skips, result.context.skips
        assert len(result.context.rewrites) == layers
        assert len(op_nodes(result.gm)) == layers
    rows = slice(None) if mask is None else mask.bool()  # padded queries attend to nothing real
    assert max_abs_error(reference, logits, rows) <= fp32_tolerance(reference)


def test_packed_position_ids_from_the_caller_stay_dense():
    """Two sequences packed in one row: transformers keeps them apart, so must we."""
    model = tiny_hf.build("llama")
    ids, _ = _batch(padded=False)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]).expand(2, -1)
    reference = _logits(model, ids, position_ids=positions)
    logits = _logits(torch.compile(model, backend="infinitehip_eager"), ids,
                     position_ids=positions)
    (result,) = compiled_results()
    assert not result.context.rewrites
    assert len(result.context.skips) == tiny_hf.num_attention_layers(model)
    assert all("packed sequences" in s.reason for s in result.context.skips)
    assert max_abs_error(reference, logits) <= fp32_tolerance(reference)
