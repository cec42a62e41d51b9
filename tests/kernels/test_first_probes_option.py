"""``first_probe_parts`` / the op's ``first_probes``: validated in the config, emitted per layer,
and passed by every selecting path of ``torch.ops.ihip.attention`` (prefill, cached decode,
offloaded decode) to the pruning, checked against direct calls with the same value."""

import pytest
import torch

from ihip_compile import IHipConfig
from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.decode_selection_cache import SelectionStates, cached_sparse_decode
from ihip_compile.kernels.sparse_attention import sparse_attention
from ihip_compile.layer_policy import sparse_args_for_layer
from ihip_compile.offload import OffloadedCache

# One 64-token first-stage chunk kept of three: how its parts are probed decides which survives.
SELECT = dict(block_size_q=16, sink_tokens=4, window_tokens=8, selected_tokens=16,
              stage_chunks=[64, 8], stage_keeps=[64, 16])
OP_ARGS = dict(dense_below_tokens=64, **SELECT)


def _qkv(s_q, s_k, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, s, 16, generator=g, dtype=torch.float64)
                 for n, s in ((4, s_q), (2, s_k), (2, s_k)))


def test_default_and_valid_values():
    assert IHipConfig().first_probe_parts == 8
    assert IHipConfig(first_probe_parts=2).first_probe_parts == 2
    assert IHipConfig.from_options({"first_probe_parts": 32}).as_dict()["first_probe_parts"] == 32


@pytest.mark.parametrize("bad", [0, 1, 3, 6, True, 4.0, "8"])
def test_bad_values_name_the_key_and_what_is_allowed(bad):
    with pytest.raises(ValueError, match="first_probe_parts must be a power of two >= 2"):
        IHipConfig(first_probe_parts=bad)


def test_layer_policy_emits_it_for_every_layer():
    config = IHipConfig(first_probe_parts=2)
    assert {sparse_args_for_layer(config, layer)["first_probes"] for layer in range(5)} == {2}


def _prefill_outputs(first_probes, seed):
    q, k, v = _qkv(32, 192, seed)  # two query blocks: not a decode-sized selection
    pos = torch.arange(192 - 32, 192)
    got = torch.ops.ihip.attention(q, k, v, pos, None, None, layer=0, scale=0.25,
                                   first_probes=first_probes, **OP_ARGS)
    want = sparse_attention(q, k, v, pos, scale=0.25, use_triton=False,
                            first_probes=first_probes, **SELECT)
    return got, want


# Above the decode floor (one probe per 8 keys of a 64-key chunk: 8 parts), so that the value
# passed decides the search on every path.
PARTS = (8, 32)


def _seed_where_parts_matter(outputs):
    """First seed whose results differ between the two part counts: the check can then fail."""
    for seed in range(20):
        if not torch.equal(outputs(PARTS[0], seed)[1], outputs(PARTS[1], seed)[1]):
            return seed
    raise AssertionError(f"no input tells {PARTS} probed parts apart: the test proves nothing")


def _decode_outputs(first_probes, seed, layer=900):
    q, k, v = _qkv(1, 192, seed)
    pos = torch.tensor([191])
    # The in-memory op caches selections per layer: a layer of its own per value, and the same key
    # length on every call, so each call selects from stage 0.
    got = torch.ops.ihip.attention(q, k, v, pos, None, None, layer=layer + first_probes,
                                   scale=0.25, refresh_intervals=[1, 1],
                                   first_probes=first_probes, **OP_ARGS)
    want = cached_sparse_decode(q, k, v, pos, layer=0, refresh_intervals=[1, 1], scale=0.25,
                                states=SelectionStates(), first_probes=first_probes, **SELECT)
    return got, want


def _offloaded_outputs(first_probes, seed):
    q, k, v = (t.float() for t in _qkv(1, 192, seed))
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=256,
                           dtype=torch.float32, gpu_cache_tokens=128)
    cache.update(k[:, :, :-1], v[:, :, :-1], 0)
    k_proxy, v_proxy = cache.update(k[:, :, -1:], v[:, :, -1:], 0)
    pos = torch.tensor([191])
    got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, layer=0, scale=0.25,
                                   refresh_intervals=[1, 1], first_probes=first_probes,
                                   **OP_ARGS)
    want = cached_sparse_decode(q, k, v, pos, layer=0, refresh_intervals=[1, 1], scale=0.25,
                                states=SelectionStates(), first_probes=first_probes, **SELECT)
    return got, want


@pytest.mark.parametrize("outputs", [_prefill_outputs, _decode_outputs, _offloaded_outputs],
                         ids=["prefill", "cached_decode", "offloaded_decode"])
def test_op_passes_first_probes_to_the_selection(outputs):
    seed = _seed_where_parts_matter(outputs)
    for parts in PARTS:
        got, want = outputs(parts, seed)
        assert torch.equal(got, want), parts


def _needle_found(seed: int, s_q: int) -> bool:
    """An isolated run of 8 keys matching the last query, anywhere among noise keys: selected?"""
    g = torch.Generator().manual_seed(seed)
    s_k = 1024
    q = torch.randn(1, 4, s_q, 16, generator=g, dtype=torch.float64)
    k = 0.1 * torch.randn(1, 2, s_k, 16, generator=g, dtype=torch.float64)
    start = int(torch.randint(64, s_k - 64, (1,), generator=g))
    k[0, 0, start:start + 8] = 3 * q[0, 0, -1]
    blocks = select_blocks(q, k, torch.arange(s_k - s_q, s_k), block_size_q=s_q, sink_tokens=4,
                           window_tokens=8, selected_tokens=16, stage_chunks=[64, 8],
                           stage_keeps=[64, 16], first_probes=2, use_triton=False)
    return bool({start // 8, (start + 7) // 8} & set(blocks[0, -1].tolist()))


def test_a_decode_step_probes_every_8_key_run(monkeypatch):
    from ihip_compile.kernels import block_selection

    seeds = range(12)
    assert all(_needle_found(seed, s_q=1) for seed in seeds)
    # Without the decode floor, 2 parts (the paper's halving) lose some of these needles.
    monkeypatch.setattr(block_selection, "DECODE_KEYS_PER_PROBE", 1 << 30)
    assert not all(_needle_found(seed, s_q=1) for seed in seeds)
