"""Chunked prefill: same cache and continuation as one-shot prefill, then generate()."""

import pytest
import torch
from transformers import DynamicCache

from ihip_compile.chunked_prefill import chunked_prefill
from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf
from tests.offload import _op_attention


@pytest.fixture(scope="module")
def model():
    return tiny_hf.build("llama")


def _ids(n, batch=1):
    return torch.randint(3, tiny_hf.VOCAB, (batch, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_after_chunked_prefill_matches_plain_generate(model, batch):
    ids = _ids(29, batch)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    cache = DynamicCache(config=model.config)
    assert chunked_prefill(model, ids, cache, chunk_tokens=8, progress=False) is not None
    assert cache.get_seq_length() == 28
    got = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_a_prompt_holding_the_pad_token_continues_right_with_an_explicit_mask(model):
    """Without a mask, generate() takes prompt tokens equal to a pad id that is not the eos id
    for padding, which moves the new tokens' positions against the filled cache (logits off by
    ~0.05 here); with the all-ones mask it continues exactly as one plain generate()."""
    ids = _ids(29)
    ids[0, [5, 17]] = 1
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=1, eos_token_id=2,
                  output_logits=True, return_dict_in_generate=True)

    def logits(**extra):
        return torch.stack(model.generate(ids, **kwargs, **extra).logits)

    want = logits(attention_mask=torch.ones_like(ids))
    tolerance = 1e-5 * want.abs().max()
    for mask in (False, True):
        cache = DynamicCache(config=model.config)
        chunked_prefill(model, ids, cache, chunk_tokens=8, progress=False)
        extra = {"attention_mask": torch.ones_like(ids)} if mask else {}
        error = (logits(past_key_values=cache, **extra) - want).abs().max()
        assert (error <= tolerance) == mask


def test_last_token_logits_match_one_forward(model):
    ids = _ids(23)
    full = model(ids).logits[:, -1].double()
    logits = chunked_prefill(model, ids, DynamicCache(config=model.config), chunk_tokens=5,
                             leave_last=False, progress=False)
    # Data-derived bound: chunking only reorders fp32 sums; compare with the one-shot fp32 error
    # against an fp64 forward.
    full64 = model.double()(ids).logits[:, -1]
    model.float()
    bound = 2 * (full - full64).abs().max() + 1e-5
    assert (logits.double() - full64).abs().max() <= bound


def test_chunked_prefill_into_offloaded_cache(model):
    ids = _ids(31)
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.config._attn_implementation = _op_attention.NAME
    try:
        cache = OffloadedCache(model.config, max_cache_tokens=40)
        chunked_prefill(model, ids, cache, chunk_tokens=10, progress=False)
        got = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    finally:
        model.config._attn_implementation = "sdpa"
    assert torch.equal(got, want)
    assert cache.store.lengths == [34, 34]


def test_a_compiled_model_is_not_recompiled_for_a_prompt_of_another_length(model):
    """Each chunk goes in with strides of its own: a compiled model guards its inputs' strides,
    and a view into the prompt has the prompt's length as its row stride."""
    compiled = torch.compile(model, backend="eager")
    counters = torch._dynamo.utils.counters["stats"]
    for length in (41, 57):
        before = counters["unique_graphs"]
        chunked_prefill(compiled, _ids(length), DynamicCache(config=model.config),
                        chunk_tokens=8, progress=False)
        made = counters["unique_graphs"] - before
    assert made == 0


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_prefill(model, _ids(4), DynamicCache(config=model.config), chunk_tokens=0)
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        chunked_prefill(model, _ids(4)[0], DynamicCache(config=model.config))
