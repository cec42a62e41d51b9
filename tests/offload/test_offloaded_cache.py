"""OffloadedCache through generate(): same tokens as DynamicCache, eager and compiled."""

import pytest
import torch

from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf
from tests.offload import _op_attention


@pytest.fixture
def model():
    m = tiny_hf.build("llama", attn_implementation="sdpa")
    yield m


def _prompt(n, seed=0):
    return torch.randint(3, tiny_hf.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, impl, cache=None, new=6):
    model.config._attn_implementation = impl
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = impl
    kwargs = {"past_key_values": cache} if cache is not None else {}
    return model.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)


def test_generate_with_offloaded_cache_matches_dynamic_cache(model):
    ids = _prompt(21)
    want = _generate(model, ids, "sdpa")
    cache = OffloadedCache(model.config, max_cache_tokens=32, gpu_cache_tokens=16)
    got = _generate(model, ids, _op_attention.NAME, cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 21 + 6 - 1
    keys, _ = cache.store.read_tokens(1)
    assert keys.shape[2] == cache.get_seq_length()


def test_proxies_hold_no_memory_and_poison_foreign_attention(model):
    cache = OffloadedCache(model.config, max_cache_tokens=16)
    k = torch.randn(1, 2, 5, 16)
    keys, values = cache.update(k, k.clone(), 0)
    assert keys.shape == (1, 2, 5, 16) and keys.untyped_storage().nbytes() == keys.element_size()
    q = torch.randn(1, 4, 5, 16)
    plain = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    assert torch.isnan(plain).all()


def test_compiled_decode_does_not_recompile_per_step(model):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = _prompt(19, seed=1)
    want = _generate(model, ids, "sdpa", new=8)
    model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=None)
    try:
        cache = OffloadedCache(model.config, max_cache_tokens=40)
        got = _generate(model, ids, _op_attention.NAME, cache, new=8)
    finally:
        del model.forward
    assert torch.equal(got, want)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 3, f"{frames} graphs for 8 decode steps"


def test_cache_refuses_beam_search_style_reordering(model):
    cache = OffloadedCache(model.config, max_cache_tokens=16)
    cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))


def test_rows_the_cache_was_not_made_for_are_refused_with_the_batch_size_to_use(model):
    cache = OffloadedCache(model.config, max_cache_tokens=16)
    with pytest.raises(ValueError, match="batch 1, .*: make the cache with batch_size=2"):
        cache.update(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), 0)


def test_cache_too_large_for_host_memory_fails_at_construction(model):
    with pytest.raises(ValueError, match="bytes of host memory .* are available"):
        OffloadedCache(model.config, max_cache_tokens=10**13)


def test_bank_sizes_come_from_the_config_or_the_arguments(model):
    from ihip_compile.config import IHipConfig

    config = IHipConfig(gpu_cache_tokens=64, pruning_cache_tokens=256)
    cache = OffloadedCache(model.config, max_cache_tokens=16, ihip_config=config)
    assert cache.store.bank_slots == {"attention": 64 // 8, "pruning": 256 // 8}
    cache = OffloadedCache(model.config, max_cache_tokens=16, gpu_cache_tokens=32)
    assert cache.store.bank_slots == {"attention": 32 // 8, "pruning": 2 * 32 // 8}
    assert IHipConfig().pruning_bank_tokens() == 2 * IHipConfig().gpu_cache_tokens
    with pytest.raises(ValueError, match="pruning_cache_tokens"):
        IHipConfig(pruning_cache_tokens=0)


def test_step_graphs_follow_the_decode_cuda_graphs_option_or_the_argument(model):
    from ihip_compile.config import IHipConfig

    assert OffloadedCache(model.config, max_cache_tokens=16).store.cuda_graphs
    off = IHipConfig(decode_cuda_graphs=False)
    assert not OffloadedCache(model.config, max_cache_tokens=16, ihip_config=off).store.cuda_graphs
    assert OffloadedCache(model.config, max_cache_tokens=16, ihip_config=off,
                          cuda_graphs=True).store.cuda_graphs
