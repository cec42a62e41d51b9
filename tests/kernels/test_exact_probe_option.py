"""``exact_probe_query_blocks`` / the op's ``exact_probe_blocks``: small selections (decode steps,
short prompts, the blocks of a prompt's last queries) score every key of each chunk, larger ones
keep the first-probe search, and keys in host memory are never read in full."""

import pytest
import torch

from ihip_compile import IHipConfig
from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.decode_selection_cache import SelectionStates, cached_sparse_decode
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.layer_policy import sparse_args_for_layer

SELECT = dict(block_size_q=16, sink_tokens=4, window_tokens=8, selected_tokens=16,
              stage_chunks=[64, 8], stage_keeps=[64, 16])
EXACT = max(SELECT["stage_chunks"])  # first_probes this large probe every key of every stage


def _qk(s_q, s_k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, s_q, 16, generator=g, dtype=torch.float64),
            torch.randn(1, 2, s_k, 16, generator=g, dtype=torch.float64))


def _select(q, k, s_k, **kw):
    pos = torch.arange(s_k - q.shape[2], s_k)
    return select_blocks(q, k, pos, use_triton=False, **SELECT, **kw)


def _decode_seed_where_exact_matters(s_k=192):
    for seed in range(40):
        q, k = _qk(1, s_k, seed)
        if not torch.equal(_select(q, k, s_k), _select(q, k, s_k, first_probes=EXACT)):
            return seed
    raise AssertionError("no input tells exact maxima from the search: the tests prove nothing")


def test_config_default_validation_and_layer_policy():
    assert IHipConfig().exact_probe_query_blocks == 0
    with pytest.raises(ValueError, match="exact_probe_query_blocks"):
        IHipConfig(exact_probe_query_blocks=-1)
    config = IHipConfig(exact_probe_query_blocks=1)
    assert {sparse_args_for_layer(config, layer)["exact_probe_blocks"] for layer in range(4)} == {1}


def test_a_decode_step_finds_exact_maxima():
    seed = _decode_seed_where_exact_matters()
    q, k = _qk(1, 192, seed)
    exact = _select(q, k, 192, first_probes=EXACT)
    assert torch.equal(_select(q, k, 192, exact_probe_blocks=1), exact)
    assert not torch.equal(_select(q, k, 192, exact_probe_blocks=0), exact)


def test_selections_with_more_query_blocks_keep_the_search_but_for_their_last_queries():
    # 3 query blocks, exact_probe_blocks=2: the first two keep the search; the last, selected
    # again on its own (a prompt's end), is a selection of one block: exact.
    for seed in range(40):
        q, k = _qk(48, 256, seed)
        searched, exact = _select(q, k, 256), _select(q, k, 256, first_probes=EXACT)
        if (not torch.equal(searched[:, :2], exact[:, :2])
                and not torch.equal(searched[:, 2:], exact[:, 2:])):
            break
    else:
        raise AssertionError("no input tells exact maxima from the search")
    got = _select(q, k, 256, exact_probe_blocks=2)
    assert torch.equal(got[:, :2], searched[:, :2]) and torch.equal(got[:, 2:], exact[:, 2:])
    assert torch.equal(_select(q, k, 256, exact_probe_blocks=3), exact)


def test_keys_in_host_memory_keep_the_search():
    seed = _decode_seed_where_exact_matters()
    q, k = _qk(1, 192, seed)
    block = 8
    blocks = k.view(1, 2, 192 // block, block, 16).permute(0, 2, 1, 3, 4)
    in_host = BlockMajorKeys(blocks.reshape(-1, 2, block, 16).contiguous(), 1, 192,
                             torch.device("cpu"))
    assert torch.equal(_select(q, in_host, 192, exact_probe_blocks=1), _select(q, k, 192))


def test_op_passes_it_to_the_decode_selection():
    seed = _decode_seed_where_exact_matters()
    q, k = _qk(1, 192, seed)
    v = torch.randn_like(k)
    pos = torch.tensor([191])
    got = torch.ops.ihip.attention(q, k, v, pos, None, None, layer=990, scale=0.25,
                                   refresh_intervals=[1, 1], exact_probe_blocks=1,
                                   dense_below_tokens=64, **SELECT)
    want = cached_sparse_decode(q, k, v, pos, layer=0, refresh_intervals=[1, 1], scale=0.25,
                                states=SelectionStates(), first_probes=EXACT, **SELECT)
    assert torch.equal(got, want)
