"""``options={"offload_kv": True}``: generate() with its own DynamicCache, K/V in host memory."""

import pytest
import torch

from ihip_compile.kernels import cache_concat_offload
from tests.models import tiny_hf
from tests.offload.test_backend_offload import OPTIONS


@pytest.mark.parametrize("fp8_pruning_keys", [False, True])
def test_offload_kv_option_moves_dynamic_cache_to_host_and_matches(fp8_pruning_keys):
    torch._dynamo.reset()
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options={**OPTIONS, "offload_kv": True,
                                                        "fp8_pruning_keys": fp8_pruning_keys})
    cache_concat_offload._STORES.clear()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    (store,) = cache_concat_offload._STORES.values()
    assert store.lengths == [41, 41]
    want_pruning_dtype = torch.float8_e4m3fn if fp8_pruning_keys else store.storage_dtype
    assert store.pruning_bank(0).tensors["keys"].dtype == want_pruning_dtype
    # The option's banks: the configured attention bank, a pruning bank twice its size.
    assert store.bank_slots["pruning"] == 2 * store.bank_slots["attention"]
    keys = out.past_key_values.layers[0].keys
    assert keys.untyped_storage().nbytes() == keys.element_size()  # the cache holds a proxy
    assert store.selection_states.steps == {0: 5, 1: 5}
    # A second prompt reuses the store from an empty past: a new sequence, same answer.
    again = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, want)


def test_the_half_that_waits_for_the_other_is_kept_even_if_its_buffer_is_reused():
    """Inductor may write another result into a buffer once the op that read it has run: the
    keys held until the values arrive must not change with their buffer."""
    cache_concat_offload._STORES.clear()
    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, 2, 5, 16, generator=gen), torch.randn(1, 2, 5, 16, generator=gen)
    scalars = dict(layer=0, num_layers=1, block_tokens=8, gpu_cache_tokens=64,
                   pruning_cache_tokens=128, cuda_graphs=False)
    empty = torch.empty(0)
    buffer = keys.clone()
    torch.ops.ihip.kv_offload_concat(empty, buffer, is_value=False, **scalars)
    buffer.zero_()  # the buffer reused before the values come
    torch.ops.ihip.kv_offload_concat(empty, values, is_value=True, **scalars)
    (store,) = cache_concat_offload._STORES.values()
    got_keys, got_values = store.read_tokens(0)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def test_offload_kv_through_inductor_generates_as_eager():
    # Qwen3's graph is one where Inductor reuses the keys' buffer before the values' concat.
    torch._dynamo.reset()
    cache_concat_offload._STORES.clear()
    model = tiny_hf.build("qwen3")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip", options={**OPTIONS, "offload_kv": True})
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
