"""``torch.ops.ihip.attention`` dispatch and the public ``hip_attention`` / ``select_blocks``:
dense below the threshold, sparse above (equal to dense when the budget covers every key),
dense for padding masks and model windows, clear errors for bad inputs."""

import pytest
import torch

import ihip_compile
from ihip_compile import IHipConfig, Stage
from ihip_compile.kernels import ops  # noqa: F401  (registers torch.ops.ihip.attention)
from ihip_compile.kernels.dense_attention_ref import dense_attention

# Every key fits the budget: the sparse path must then equal dense attention.
COVER_ALL = IHipConfig(dense_below_tokens=64, block_size_q=16, sink_tokens=4,
                       sliding_window_tokens=16, selected_tokens=1024,
                       stages=(Stage(32, 1024), Stage(8, 1024)), refresh_intervals=(1, 1))


def _qkv(heads=4, kv_heads=2, s_q=21, s_k=150, dtype=torch.float64, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, s, d, generator=gen, dtype=dtype)
                 for n, s in ((heads, s_q), (kv_heads, s_k), (kv_heads, s_k)))


def _op(q, k, v, kv_valid=None, **kw):
    s_q, s_k = q.shape[2], k.shape[2]
    pos = torch.arange(s_k - s_q, s_k)
    args = dict(layer=0, scale=0.2, dense_below_tokens=64, block_size_q=16, sink_tokens=4,
                window_tokens=16, selected_tokens=8, stage_chunks=[32, 8],
                stage_keeps=[64, 8])
    args.update(kw)
    return torch.ops.ihip.attention(q, k, v, pos, kv_valid, None, **args), pos


def test_below_threshold_is_exactly_dense():
    q, k, v = _qkv(s_k=60)
    out, pos = _op(q, k, v)
    assert torch.equal(out, dense_attention(q, k, v, pos, scale=0.2))


def test_above_threshold_is_sparse():
    q, k, v = _qkv()
    out, pos = _op(q, k, v)
    assert (out - dense_attention(q, k, v, pos, scale=0.2)).abs().max() > 1e-3


def test_padding_mask_and_model_window_take_the_dense_path():
    q, k, v = _qkv()
    valid = torch.ones(1, 150, dtype=torch.bool)
    valid[0, :7] = False
    out, pos = _op(q, k, v, kv_valid=valid)
    assert torch.equal(out, dense_attention(q, k, v, pos, valid, scale=0.2))
    out, pos = _op(q, k, v, model_window=40)
    assert torch.equal(out, dense_attention(q, k, v, pos, scale=0.2, model_window=40))


def test_a_long_context_kept_dense_by_its_inputs_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_WARNED", set())
    q, k, v = _qkv()
    valid = torch.ones(1, 150, dtype=torch.bool)
    valid[0, :7] = False
    with caplog.at_level("WARNING"):
        _op(q, k, v, kv_valid=valid)
        _op(q, k, v, kv_valid=valid)
        _op(q, k, v[..., :16])
        _op(q, k, v, model_window=40)  # the model's own window: dense by design, no warning
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert "150 keys" in warned[0] and "padding" in warned[0]
    assert "value head dim 16 differs from the query's 32" in warned[1]


def test_padding_mask_that_hides_nothing_takes_the_sparse_path():
    # generate() passes an all-true mask at every step: it must not force dense attention.
    q, k, v = _qkv()
    plain, _ = _op(q, k, v)
    masked, _ = _op(q, k, v, kv_valid=torch.ones(1, 150, dtype=torch.bool))
    assert torch.equal(masked, plain)


@pytest.mark.parametrize("s_q", [1, 21])
def test_hip_attention_with_covering_budget_equals_dense(s_q):
    q, k, v = _qkv(heads=6, kv_heads=2, s_q=s_q, s_k=131)
    out = ihip_compile.hip_attention(q, k, v, config=COVER_ALL, scale=0.3)
    pos = torch.arange(131 - s_q, 131)
    assert (out - dense_attention(q, k, v, pos, scale=0.3)).abs().max() < 1e-12


def test_select_blocks_public_shape():
    q, k, _ = _qkv(s_q=40)
    blocks = ihip_compile.select_blocks(q, k, config=COVER_ALL)
    # [B, 1, NQB, TOPK] (one selection per layer); TOPK = min(budget 1024 / 8, ceil(150 / 32)
    # chunks x 4 blocks) = 20
    assert blocks.shape == (1, 1, 3, 20) and blocks.dtype == torch.int32


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k[..., :16], v), "D=32"),
    (lambda q, k, v: (q[:, :3], k, v), "divide"),
    (lambda q, k, v: (q, k.float(), v), "share a dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "not supported"),
    (lambda q, k, v: (q, k.to("meta"), v), "one device"),
])
def test_bad_inputs_get_clear_errors(change, match):
    q, k, v = change(*_qkv())
    with pytest.raises(ValueError, match=match):
        ihip_compile.hip_attention(q, k, v, config=COVER_ALL)
