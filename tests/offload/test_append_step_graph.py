"""Decode appends replayed as a CUDA graph (``append_step_graph``): every token lands in host
memory bit-exact, the graph is captured once per layer and again when the store grows."""

import logging

import pytest
import torch

from ihip_compile.kernels import append_step_graph
from ihip_compile.offload import OffloadedCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _appended(storage=torch.float32, steps=20, grow_at=None):
    gen = torch.Generator().manual_seed(1)
    cache = OffloadedCache(num_layers=2, kv_heads=2, head_dim=16, max_cache_tokens=320,
                           dtype=torch.float32, device="cuda", gpu_cache_tokens=128,
                           storage_dtype=storage)
    keys = [torch.randn(1, 2, 300, 16, generator=gen).cuda() for _ in range(2)]
    values = [torch.randn(1, 2, 300, 16, generator=gen).cuda() for _ in range(2)]
    for layer in range(2):
        cache.update(keys[layer], values[layer], layer)
    for step in range(steps):
        if step == grow_at:
            cache.store.grow(640)
        for layer in range(2):
            k_new, v_new = (torch.randn(1, 2, 1, 16, generator=gen).cuda() for _ in "kv")
            cache.update(k_new, v_new, layer)
            keys[layer] = torch.cat([keys[layer], k_new], 2)
            values[layer] = torch.cat([values[layer], v_new], 2)
    return cache, keys, values


@pytest.mark.parametrize("storage", [torch.float32, torch.float8_e4m3fn])
def test_every_decode_token_reads_back_bit_exact(storage):
    cache, keys, values = _appended(storage)
    for layer in range(2):
        got_k, got_v = cache.store.read_tokens(layer)
        assert torch.equal(got_k, keys[layer].to(storage).float())
        assert torch.equal(got_v, values[layer].to(storage).float())
        graph = cache.store.append_graphs[layer]
        assert (graph.captures, graph.replays) == (1, 20)


def test_a_grown_store_captures_again():
    cache, keys, values = _appended(steps=30, grow_at=10)
    for layer in range(2):
        got_k, got_v = cache.store.read_tokens(layer)
        assert torch.equal(got_k, keys[layer]) and torch.equal(got_v, values[layer])
        assert cache.store.append_graphs[layer].captures == 2


def test_a_failed_capture_keeps_ordinary_appends_and_says_so(monkeypatch, caplog):
    def fail(*_args, **_kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(append_step_graph, "capture_cuda_graph", fail)
    with caplog.at_level(logging.WARNING):
        cache, keys, values = _appended()
    assert "capture refused" in caplog.text
    got_k, got_v = cache.store.read_tokens(1)
    assert torch.equal(got_k, keys[1]) and torch.equal(got_v, values[1])
    assert cache.store.append_graphs[1].replays == 0
