"""``first_probe_parts`` / the op's ``first_probes``: validated in the config, emitted per layer,
and passed by every selecting path of ``torch.ops.ihip.attention`` (prefill, cached decode,
offloaded decode) to the pruning, checked against direct calls with the same value."""

import pytest
import torch

from ihip_compile import IHipConfig
from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
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
    q, k, v = _qkv(16, 192, seed)
    pos = torch.arange(192 - 16, 192)
    got = torch.ops.ihip.attention(q, k, v, pos, None, None, layer=0, scale=0.25,
                                   first_probes=first_probes, **OP_ARGS)
    want = sparse_attention(q, k, v, pos, scale=0.25, use_triton=False,
                            first_probes=first_probes, **SELECT)
    return got, want


def _seed_where_parts_matter(outputs):
    """First seed whose results differ between 2 and 8 parts: the check below can then fail."""
    for seed in range(20):
        if not torch.equal(outputs(2, seed)[1], outputs(8, seed)[1]):
            return seed
    raise AssertionError("no input tells 2 probed parts from 8: the test shape proves nothing")


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
    for parts in (2, 8):
        got, want = outputs(parts, seed)
        assert torch.equal(got, want), parts
