"""A sparse prefill chunk over the offloaded cache: every key is streamed (stage 0 scores them
all) but only the values it attends are copied, and the result is the in-memory op's, exactly."""

import pytest
import torch

from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
from ihip_compile.kernels import offloaded_attention, sparse_attention
from ihip_compile.kernels.offloaded_attention import release_scratch
from ihip_compile.offload import OffloadedCache

OP_ARGS = dict(dense_below_tokens=64, block_size_q=16, sink_tokens=8, window_tokens=16,
               selected_tokens=32, stage_chunks=[32, 8], stage_keeps=[64, 32])
PROMPT, CHUNK = 200, 37


def _poison_new_value_scratch(monkeypatch):
    """Stale values in the value scratch must never be read: every one made is NaN."""
    real = offloaded_attention.scratch

    def poisoned(name, store, shape):
        made = (name, store.device, store.dtype) not in offloaded_attention._SCRATCH
        buf = real(name, store, shape)
        if made and name == "values":
            buf.fill_(float("nan"))
        return buf

    monkeypatch.setattr(offloaded_attention, "scratch", poisoned)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_sparse_prefill_chunk_copies_only_attended_values(per_kv_head, monkeypatch):
    gen = torch.Generator().manual_seed(int(per_kv_head))
    keys = torch.randn(1, 2, PROMPT + CHUNK, 16, generator=gen)
    values = torch.randn(1, 2, PROMPT + CHUNK, 16, generator=gen)
    q = torch.randn(1, 4, CHUNK, 16, generator=gen)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=256,
                           dtype=torch.float32, gpu_cache_tokens=128)
    cache.update(keys[:, :, :PROMPT], values[:, :, :PROMPT], 0)
    k_proxy, v_proxy = cache.update(keys[:, :, PROMPT:], values[:, :, PROMPT:], 0)
    release_scratch()
    _poison_new_value_scratch(monkeypatch)
    pos = torch.arange(PROMPT, PROMPT + CHUNK)
    args = dict(layer=0, scale=0.25, per_kv_head=per_kv_head, **OP_ARGS)
    before = cache.store.streamed_blocks[0]
    got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
    want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
    assert torch.equal(got, want)
    n_blocks = -(-(PROMPT + CHUNK) // 8)
    copied = cache.store.streamed_blocks[0] - before
    assert n_blocks < copied < 2 * n_blocks  # all key blocks, some value blocks


def test_no_value_scratch_is_held_while_the_prefill_selection_runs(monkeypatch):
    """The selection moves a full-length copy of the keys: the value scratch a previous chunk
    left must not sit beside it (three full-length buffers instead of two)."""
    gen = torch.Generator().manual_seed(3)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=256,
                           dtype=torch.float32, gpu_cache_tokens=128)
    held = []
    real_select = sparse_attention.select_blocks

    def select(*args, **kwargs):
        held.append(("values", cache.store.device, cache.store.dtype)
                    in offloaded_attention._SCRATCH)
        return real_select(*args, **kwargs)

    monkeypatch.setattr(sparse_attention, "select_blocks", select)
    release_scratch()
    for lo, hi in ((0, PROMPT), (PROMPT, PROMPT + CHUNK)):
        k = torch.randn(1, 2, hi - lo, 16, generator=gen)
        k_proxy, v_proxy = cache.update(k, torch.randn_like(k), 0)
        q = torch.randn(1, 4, hi - lo, 16, generator=gen)
        torch.ops.ihip.attention(q, k_proxy, v_proxy, torch.arange(lo, hi), None, None,
                                 layer=0, scale=0.25, per_kv_head=False, **OP_ARGS)
    assert held == [False, False]


def test_a_prompt_chunk_after_decode_gives_the_banks_back_and_decode_makes_them_again(
        monkeypatch):
    """A prompt's chunk reads no bank: while its selection runs the device holds no bank and no
    probe copy, only its scratch. Decode after it makes the banks again; every output is the
    in-memory op's, and the hits and misses counted before stay counted."""
    gen = torch.Generator().manual_seed(4)
    decode_steps = 3
    total = PROMPT + CHUNK + 2 * decode_steps
    keys, values = torch.randn(1, 2, total, 16, generator=gen), torch.randn(1, 2, total, 16)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=256,
                           dtype=torch.float32, gpu_cache_tokens=128)
    device_bytes_while_selecting = []
    real_select = sparse_attention.select_blocks

    def select(*args, **kwargs):
        device_bytes_while_selecting.append(cache.store.gpu_bytes)
        return real_select(*args, **kwargs)

    monkeypatch.setattr(sparse_attention, "select_blocks", select)
    op_args = dict(layer=0, scale=0.25, per_kv_head=False, refresh_intervals=[4, 2], **OP_ARGS)

    def run(lo, hi):
        k_proxy, v_proxy = cache.update(keys[:, :, lo:hi], values[:, :, lo:hi], 0)
        q, pos = torch.randn(1, 4, hi - lo, 16, generator=gen), torch.arange(lo, hi)
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **op_args)
        want = torch.ops.ihip.attention(q, keys[:, :, :hi], values[:, :, :hi], pos, None, None,
                                        **op_args)
        assert torch.equal(got, want), (lo, hi)

    def decode(start):
        for t in range(start, start + decode_steps):
            run(t, t + 1)

    run(0, PROMPT)
    decode(PROMPT)
    def bank_counts():
        return {n: c for n, c in cache.store.hit_counts()[0].items() if n.endswith(("hits",
                                                                                   "misses"))}

    counted = bank_counts()
    assert cache.store.gpu_bytes > 0 and counted["attention_misses"] > 0
    run(PROMPT + decode_steps, PROMPT + decode_steps + CHUNK)
    assert cache.store.gpu_bytes == 0
    assert bank_counts() == counted
    decode(PROMPT + decode_steps + CHUNK)
    assert cache.store.gpu_bytes > 0
    assert device_bytes_while_selecting == [0] * 4  # two chunks, ours and the in-memory op's
    assert bank_counts()["attention_misses"] > counted["attention_misses"]
