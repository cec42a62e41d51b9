"""Offloaded decode attention replayed as a CUDA graph (``decode_step_graph``), and the shortcut
that replays it between refreshes with no other work (``decode_shortcut``): same outputs as the
in-memory op, same selection and bank statistics as the ordinary path."""

import logging

import pytest
import torch

from ihip_compile.kernels import decode_shortcut, decode_step_graph
from ihip_compile.kernels.decode_selection_cache import reuse_ratio
from ihip_compile.offload import OffloadedCache
from tests.offload.test_decode_selection_cache import OP_ARGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

PROMPT, STEPS = 300, 40
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)


def _decode(monkeypatch, *, shortcut: bool, per_kv_head=False, dtype=torch.float32,
            remap=False, seed=0, storage=None, cuda_graphs=True):
    """STEPS decode steps over an offloaded cache and the same keys in memory (as ``storage``
    holds them); returns the outputs of both, the cache, and the steps the shortcut served."""
    taken = []
    original = decode_shortcut.take

    def take(*args):
        out = original(*args) if shortcut else None
        taken.append(out is not None)
        return out

    monkeypatch.setattr(decode_shortcut, "take", take)
    gen = torch.Generator().manual_seed(seed)
    stored = storage or dtype

    def as_stored(t):
        return t.to(stored).to(dtype)

    keys, values = (torch.randn(1, 2, PROMPT, 16, generator=gen).cuda().to(dtype) for _ in "kv")
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=512,
                           dtype=dtype, device="cuda", gpu_cache_tokens=256,
                           storage_dtype=stored, cuda_graphs=cuda_graphs)
    cache.update(keys, values, 0)
    keys, values = as_stored(keys), as_stored(values)
    args = dict(layer=0, scale=0.25, refresh_intervals=[16, 4], per_kv_head=per_kv_head,
                **OP_ARGS)
    inv_freq = None
    if remap:
        args.update(remap_beyond_tokens=0, rotary_dim=16, rope_layout=1)
        inv_freq = INV_FREQ.cuda()
    got, want = [], []
    for step in range(STEPS):
        q, k_new, v_new = (torch.randn(*shape, generator=gen).cuda().to(dtype)
                           for shape in ((1, 4, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16)))
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        keys = torch.cat([keys, as_stored(k_new)], 2)
        values = torch.cat([values, as_stored(v_new)], 2)
        pos = torch.tensor([keys.shape[2] - 1], device="cuda")
        got.append(torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, inv_freq, **args))
        want.append(torch.ops.ihip.attention(q, keys, values, pos, None, inv_freq, **args))
    return torch.cat(got), torch.cat(want), cache, taken


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("dtype,storage", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.float8_e4m3fn)])
def test_replayed_steps_equal_the_in_memory_op(monkeypatch, per_kv_head, dtype, storage):
    # FP8 storage: the kernel widens the bank's slots as it reads them, to exactly the values
    # the in-memory op gets widened.
    got, want, cache, taken = _decode(monkeypatch, shortcut=True, per_kv_head=per_kv_head,
                                      dtype=dtype, storage=storage)
    assert torch.equal(got, want)
    # Stage 0 ran at steps 0, 16 and 32, each reading its probes in host memory in place.
    assert cache.hit_counts()[0]["in_place_scans"] == 3
    graph = cache.store.step_graphs[0]
    assert graph.captures == 1 and graph.replays == STEPS
    # Steps 4, 8, ... refresh a stage and the window enters a new block every 8 steps: every
    # other step continues the one before, and the shortcut serves it.
    assert sum(taken) >= STEPS - STEPS // 4 - STEPS // 8 - 1, taken
    assert not any(taken[i] for i in range(4, STEPS, 4))


def test_the_shortcut_records_what_the_ordinary_path_records(monkeypatch):
    runs = {}
    for shortcut in (True, False):
        got, _, cache, taken = _decode(monkeypatch, shortcut=shortcut, seed=3)
        states = cache.store.selection_states
        runs[shortcut] = (got, cache.hit_counts(), states.stage_runs, states.steps,
                          reuse_ratio(states))
    assert any(taken) is False  # the last run: shortcut off
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1:] == runs[False][1:]


def test_renumbered_rope_replays_match_the_in_memory_op(monkeypatch):
    got, want, cache, taken = _decode(monkeypatch, shortcut=True, remap=True, seed=5)
    torch.testing.assert_close(got, want)
    assert sum(taken) > STEPS // 2


def test_a_failed_capture_keeps_ordinary_launches_and_says_so(monkeypatch, caplog):
    def fail(*_args, **_kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(decode_step_graph, "capture_cuda_graph", fail)
    with caplog.at_level(logging.WARNING):
        got, want, cache, taken = _decode(monkeypatch, shortcut=True, seed=7)
    assert torch.equal(got, want)
    assert "capture refused" in caplog.text
    graph = cache.store.step_graphs[0]
    assert graph.failure and graph.replays == 0 and not any(taken)


def test_graphs_off_launch_as_before(monkeypatch):
    got, want, cache, taken = _decode(monkeypatch, shortcut=True, cuda_graphs=False, seed=9)
    assert torch.equal(got, want)
    assert not cache.store.step_graphs and not cache.store.append_graphs and not any(taken)
