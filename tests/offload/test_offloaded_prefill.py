"""A sparse prefill chunk over the offloaded cache: every key is streamed (stage 0 scores them
all) but only the values it attends are copied, and the result is the in-memory op's, exactly."""

import pytest
import torch

from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
from ihip_compile.kernels.offloaded_attention import release_scratch, scratch
from ihip_compile.offload import OffloadedCache

OP_ARGS = dict(dense_below_tokens=64, block_size_q=16, sink_tokens=8, window_tokens=16,
               selected_tokens=32, stage_chunks=[32, 8], stage_keeps=[64, 32])
PROMPT, CHUNK = 200, 37


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_sparse_prefill_chunk_copies_only_attended_values(per_kv_head):
    gen = torch.Generator().manual_seed(int(per_kv_head))
    keys = torch.randn(1, 2, PROMPT + CHUNK, 16, generator=gen)
    values = torch.randn(1, 2, PROMPT + CHUNK, 16, generator=gen)
    q = torch.randn(1, 4, CHUNK, 16, generator=gen)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=256,
                           dtype=torch.float32, gpu_cache_tokens=128)
    cache.update(keys[:, :, :PROMPT], values[:, :, :PROMPT], 0)
    k_proxy, v_proxy = cache.update(keys[:, :, PROMPT:], values[:, :, PROMPT:], 0)
    # Stale values in the scratch must never be read: poison them.
    release_scratch()
    scratch("values", cache.store, (1, 2, 248, 16)).fill_(float("nan"))
    pos = torch.arange(PROMPT, PROMPT + CHUNK)
    args = dict(layer=0, scale=0.25, per_kv_head=per_kv_head, **OP_ARGS)
    before = cache.store.streamed_blocks[0]
    got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
    want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
    assert torch.equal(got, want)
    n_blocks = -(-(PROMPT + CHUNK) // 8)
    copied = cache.store.streamed_blocks[0] - before
    assert n_blocks < copied < 2 * n_blocks  # all key blocks, some value blocks
