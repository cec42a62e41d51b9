"""``options={"offload_kv": True}``: generate() with its own DynamicCache, K/V in host memory."""

import torch

from ihip_compile.kernels import cache_concat_offload
from tests.models import tiny_hf
from tests.offload.test_backend_offload import OPTIONS


def test_offload_kv_option_moves_dynamic_cache_to_host_and_matches():
    torch._dynamo.reset()
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options={**OPTIONS, "offload_kv": True})
    cache_concat_offload._STORES.clear()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    (store,) = cache_concat_offload._STORES.values()
    assert store.lengths == [41, 41]
    # The option's banks: the configured attention bank, a pruning bank twice its size.
    assert store.bank_slots["pruning"] == 2 * store.bank_slots["attention"]
    keys = out.past_key_values.layers[0].keys
    assert keys.untyped_storage().nbytes() == keys.element_size()  # the cache holds a proxy
    assert store.selection_states.steps == {0: 5, 1: 5}
    # A second prompt reuses the store from an empty past: a new sequence, same answer.
    again = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, want)
