"""Host KV store and its GPU block banks: nothing lost, LRU eviction, memory limits."""

import pytest
import torch

from ihip_compile.kernels import kv_store
from ihip_compile.kernels.kv_store import HostKVStore


def _store(**overrides):
    args = dict(num_layers=2, batch=2, kv_heads=2, head_dim=4, value_dim=3, capacity_tokens=200,
                block_tokens=8, dtype=torch.float32, attention_bank_tokens=32,
                pruning_bank_tokens=16)
    return HostKVStore(**{**args, **overrides})


def _fill(store, layer, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for n in sizes:
        k = torch.randn(store.batch, store.kv_heads, n, store.head_dim, generator=g)
        v = torch.randn(store.batch, store.kv_heads, n, store.value_dim, generator=g)
        store.append(layer, k.to(store.dtype), v.to(store.dtype))
        keys.append(k.to(store.dtype))
        values.append(v.to(store.dtype))
    return torch.cat(keys, 2), torch.cat(values, 2)


def _tokens_of_blocks(x, blocks, block_tokens):
    idx = torch.cat([torch.arange(b * block_tokens, (b + 1) * block_tokens) for b in blocks])
    return x[:, idx]


def test_every_key_and_value_reads_back_bit_exact_after_evictions():
    store = _store()
    keys, values = _fill(store, 1, [16, 24, 13, 1, 1, 57, 3, 1, 60])  # 176 tokens, 22 blocks
    n_blocks = 22
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # random block subsets through a 4-slot bank: constant eviction
        ids = torch.stack([torch.randperm(n_blocks, generator=g)[:5] for _ in range(2)])
        got = store.read_blocks(1, ids, "attention")
        for row in range(2):
            want_k = _tokens_of_blocks(keys[row], ids[row].tolist(), 8)
            want_v = _tokens_of_blocks(values[row], ids[row].tolist(), 8)
            n_valid = want_k.shape[1]
            assert torch.equal(got["keys"][row][:, :n_valid], want_k)
            assert torch.equal(got["values"][row][:, :n_valid], want_v)
    counts = store.hit_counts()[1]
    assert counts["attention_misses"] > 0 and counts["attention_hits"] >= 0
    k_all, v_all = store.read_tokens(1)
    assert torch.equal(k_all, keys) and torch.equal(v_all, values)
    assert store.read_tokens(0)[0].shape[2] == 0


def test_repeated_reads_hit_and_least_recently_used_block_is_evicted():
    store = _store()
    _fill(store, 0, [64])
    bank = lambda: store._banks[0]["pruning"]  # noqa: E731  (2 slots)
    row1 = store.blocks_per_row  # block ids are row * blocks_per_row + block
    store.read_blocks(0, torch.tensor([[0], [1]]), "pruning")  # 2 misses
    store.read_blocks(0, torch.tensor([[0], [1]]), "pruning")
    assert (bank().hits, bank().misses) == (2, 2)
    store.read_blocks(0, torch.tensor([[2], [1]]), "pruning")  # evicts row 0's block 0
    assert int(bank().slot_of_block[0]) == -1 and int(bank().slot_of_block[row1 + 1]) >= 0
    assert (bank().hits, bank().misses) == (3, 3)


def test_appends_write_through_to_blocks_held_in_the_bank():
    store = _store()
    keys, _ = _fill(store, 0, [10])
    store.read_blocks(0, torch.tensor([[1], [1]]))  # block 1 (tokens 8..15) now in the bank
    new_k, new_v = torch.full((2, 2, 3, 4), 7.0), torch.full((2, 2, 3, 3), 5.0)
    store.append(0, new_k, new_v)
    got = store.read_blocks(0, torch.tensor([[1], [1]]))
    assert store._banks[0]["attention"].hits == 2
    assert torch.equal(got["keys"][:, :, :2], keys[:, :, 8:10])
    assert torch.equal(got["keys"][:, :, 2:5], new_k)
    assert torch.equal(got["values"][:, :, 2:5], new_v)


def test_fp8_storage_reads_back_the_fp8_rounding():
    store = _store(dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    keys, values = _fill(store, 0, [9, 7])
    k_all, v_all = store.read_tokens(0)
    assert torch.equal(k_all, keys.to(torch.float8_e4m3fn).to(torch.float32))
    got = store.read_blocks(0, torch.tensor([[0, 1], [1, 0]]))
    assert torch.equal(got["values"][0], v_all[0])
    assert store.host_bytes == 2 * 2 * 200 * 2 * (4 + 3) * 1


def test_fp8_pruning_keys_serve_the_pruning_bank_and_the_stored_keys_the_rest():
    store = _store(dtype=torch.bfloat16, pruning_key_dtype=torch.float8_e4m3fn,
                   pruning_bank_tokens=32)
    keys, values = _fill(store, 0, [9, 4])
    ids = torch.tensor([[0, 1], [1, 0]])
    store.read_blocks(0, ids, "pruning")  # the bank holds block 1: the appends write through
    more_k, more_v = _fill(store, 0, [3], seed=4)
    keys, values = torch.cat([keys, more_k], 2), torch.cat([values, more_v], 2)
    fp8 = keys.to(torch.float8_e4m3fn).to(torch.bfloat16)
    for kind, want in (("pruning", fp8), ("attention", keys)):
        got = store.read_blocks(0, ids, kind)["keys"]
        assert torch.equal(got[0, :, :16], want[0, :, :16])
        assert torch.equal(got[1, :, :8], want[1, :, 8:16])
        assert torch.equal(got[1, :, 8:16], want[1, :, :8])
    assert store._banks[0]["pruning"].hits == 4
    assert store._banks[0]["pruning"].tensors["keys"].dtype == torch.float8_e4m3fn
    streamed = torch.empty(2, 2, 16, 4, dtype=torch.bfloat16)
    store.stream_into(0, {"keys": streamed}, kind="pruning")  # stage 0 without in-place reads
    assert torch.equal(streamed, fp8)
    store.grow(300)  # every copy, the FP8 keys too, moves with the tokens
    k_all, v_all = store.read_tokens(0)
    assert torch.equal(k_all, keys) and torch.equal(v_all, values)
    assert torch.equal(store.read_blocks(0, ids, "pruning")["keys"][0, :, :16], fp8[0, :, :16])
    per_token = 2 * (4 + 3) + 4  # 16-bit keys and values, the FP8 keys
    assert store.host_bytes == 2 * 2 * 304 * 2 * per_token
    with pytest.raises(ValueError, match="pruning_key_dtype must be"):
        _store(dtype=torch.bfloat16, pruning_key_dtype=torch.float32)


def test_appending_past_capacity_names_the_limit():
    store = _store(capacity_tokens=16)
    _fill(store, 0, [16])
    with pytest.raises(ValueError, match="exceed the cache's max_cache_tokens"):
        _fill(store, 0, [1])


def test_request_beyond_host_memory_fails_before_allocating(monkeypatch):
    monkeypatch.setattr(kv_store, "available_host_bytes", lambda: 10_000)
    with pytest.raises(ValueError, match=r"needs 44,800 bytes .* only 10,000 bytes"):
        _store()


def test_a_dropped_store_held_by_a_reference_cycle_is_collected_before_refusing(monkeypatch):
    """The cache a model was compiled with stays in the compiler's reference cycles after it is
    dropped: a new cache that needs its memory must not be refused for it."""
    import gc
    import weakref

    live = weakref.WeakSet()
    total = int(1.5 * _store().host_bytes)  # room for one store, not two
    monkeypatch.setattr(kv_store, "available_host_bytes",
                        lambda: total - sum(store.host_bytes for store in live))
    gc.disable()
    try:
        first = _store()
        first.cycle = first
        live.add(first)
        del first
        second = _store()  # would be refused while the first is held
        live.add(second)
    finally:
        gc.enable()
    assert list(live) == [second]


def test_real_host_memory_is_checked():
    with pytest.raises(ValueError, match="bytes of host memory"):
        _store(capacity_tokens=10**13)


def test_bad_layer_and_shapes_are_rejected():
    store = _store()
    with pytest.raises(ValueError, match="layer must be in"):
        store.append(2, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3))
    with pytest.raises(ValueError, match="do not fit"):
        store.append(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 3))


def test_growing_keeps_every_token_and_checks_memory_first(monkeypatch):
    store = _store(capacity_tokens=16)
    keys, values = _fill(store, 0, [16])
    store.read_blocks(0, torch.tensor([[1], [0]]))
    store.grow(40)
    assert store.capacity_tokens == 40
    more_k, more_v = _fill(store, 0, [20], seed=5)
    k_all, v_all = store.read_tokens(0)
    assert torch.equal(k_all, torch.cat([keys, more_k], 2))
    assert torch.equal(v_all, torch.cat([values, more_v], 2))
    got = store.read_blocks(0, torch.tensor([[4], [4]]))  # banks restart empty after growing
    assert torch.equal(got["keys"][:, :, :4], k_all[:, :, 32:36])
    monkeypatch.setattr(kv_store, "available_host_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="bytes of host memory"):
        store.grow(10_000)
    assert store.capacity_tokens == 40


def test_a_block_named_twice_is_counted_and_admitted_once():
    store = _store()
    keys, _ = _fill(store, 0, [24])
    got = store.read_blocks(0, torch.tensor([[2, 2, 0], [1, 1, 1]]))
    assert torch.equal(got["keys"][0], torch.cat([keys[0, :, 16:24]] * 2 + [keys[0, :, 0:8]], 1))
    bank = store._banks[0]["attention"]
    assert (bank.hits, bank.misses) == (0, 3)
    assert int((bank.block_of_slot >= 0).sum()) == 3


def test_allocating_up_front_keeps_every_token_the_same():
    with pytest.raises(ValueError, match="device"):
        _store().allocate()
    lazy, eager = _store(device="cpu"), _store(device="cpu")
    eager.allocate()
    assert all(host is not None for host in eager._host)
    assert all(host is None for host in lazy._host)
    for store in (lazy, eager):
        keys, values = _fill(store, 1, [40, 3])
        assert all(torch.equal(a, b) for a, b in zip(store.read_tokens(1), (keys, values)))
