"""Selection scope: with ``selection_scope="kv_head"`` a KV head's blocks depend only on its own
query heads and keys; with ``"layer"`` (the default) all heads share one selection.

Per KV head is what makes the op shard-invariant under tensor parallelism (a rank holding some KV
heads selects and attends exactly as one process does for them).
"""

import dataclasses

import pytest
import torch

import ihip_compile
from ihip_compile import IHipConfig, Stage
from ihip_compile.kernels.dense_attention_ref import dense_attention
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE

# Selective enough at 160 keys that different heads pick different blocks.
SELECTIVE = IHipConfig(dense_below_tokens=64, block_size_q=16, sink_tokens=4,
                       sliding_window_tokens=16, selected_tokens=16,
                       stages=(Stage(32, 64), Stage(8, 16)), refresh_intervals=(1, 1),
                       selection_scope="kv_head")
PER_LAYER = dataclasses.replace(SELECTIVE, selection_scope="layer")


def _qkv(heads, kv_heads, s_q, s_k=160, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, s, d, generator=gen, dtype=torch.float64)
                 for n, s in ((heads, s_q), (kv_heads, s_k), (kv_heads, s_k)))


@pytest.mark.parametrize("heads,kv_heads", [(6, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("s_q", [1, 20])
def test_each_kv_head_selects_as_if_it_were_alone(heads, kv_heads, s_q):
    q, k, _ = _qkv(heads, kv_heads, s_q, seed=heads + s_q)
    group = heads // kv_heads
    together = ihip_compile.select_blocks(q, k, config=SELECTIVE)
    assert together.shape[:2] == (2, kv_heads)
    for j in range(kv_heads):
        alone = ihip_compile.select_blocks(q[:, j * group:(j + 1) * group], k[:, j:j + 1],
                                           config=SELECTIVE)
        assert torch.equal(together[:, j:j + 1], alone)


@pytest.mark.parametrize("s_q", [1, 20])
def test_attention_on_a_shard_of_heads_equals_that_shard_of_all_heads(s_q):
    # selection_scope="kv_head"
    # Two ranks of tensor parallelism: each holds half of the query and KV heads.
    q, k, v = _qkv(8, 4, s_q, seed=7)
    full = ihip_compile.hip_attention(q, k, v, config=SELECTIVE)
    dense = dense_attention(q, k, v, torch.arange(160 - s_q, 160), scale=q.shape[-1] ** -0.5)
    assert (full - dense).abs().max() > 1e-3  # the sparse path really ran
    for rank in range(2):
        heads, kv = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
        shard = ihip_compile.hip_attention(q[:, heads], k[:, kv], v[:, kv], config=SELECTIVE)
        assert torch.equal(shard, full[:, heads])


def test_layer_scope_shares_one_selection_and_depends_on_all_heads():
    q, k, _ = _qkv(6, 3, s_q=20, seed=5)
    shared = ihip_compile.select_blocks(q, k, config=PER_LAYER)
    assert shared.shape[:2] == (2, 1)
    alone = ihip_compile.select_blocks(q[:, :2], k[:, :1], config=PER_LAYER)
    assert not torch.equal(shared, alone)  # so the layer scope is not shard-invariant


def test_a_key_one_head_needs_is_selected_for_that_head_only():
    q, k, _ = _qkv(4, 2, s_q=1, seed=3)
    # Keys 56..79 of KV head 1 align with its queries (heads 2, 3): they dominate its scores.
    direction = q[:, 2:4, 0].mean(1, keepdim=True)
    k[:, 1, 56:80] = 3.0 * k.norm(dim=-1).mean() * direction / direction.norm(dim=-1, keepdim=True)
    blocks = ihip_compile.select_blocks(q, k, config=SELECTIVE)
    assert torch.isin(blocks[:, 1], torch.arange(7, 10)).any(-1).all()
    plain = ihip_compile.select_blocks(q[:, :2], k[:, :1], config=SELECTIVE)
    assert torch.equal(blocks[:, :1], plain)


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("s_q", [1, 19])
def test_kernels_in_either_scope_equal_dense_when_the_budget_covers_all(s_q, per_kv_head):
    # Triton kernels (interpreted on CPU) on the folded layout: a head reading another head's
    # keys, or a block list of the wrong KV head, would differ from dense attention here.
    from ihip_compile.kernels.sparse_attention import sparse_attention

    gen = torch.Generator().manual_seed(s_q)
    q, k, v = (torch.randn(2, n, s, 16, generator=gen).to(DEVICE)
               for n, s in ((6, s_q), (2, 133), (2, 133)))
    pos = torch.arange(133 - s_q, 133, device=DEVICE)
    out = sparse_attention(q, k, v, pos, scale=0.25, block_size_q=16, sink_tokens=4,
                           window_tokens=16, selected_tokens=1024, stage_chunks=(32, 8),
                           stage_keeps=(1024, 1024), use_triton=True, per_kv_head=per_kv_head)
    assert_matches_reference(out, dense_attention, q, k, v, pos, scale=0.25)
