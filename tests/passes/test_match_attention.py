"""match_attention + rewrite_attention: what is rewritten, what must stay as it was, and why."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pass_graphs import compile_and_run, qkv, repeat_kv


def _causal_mask(s_q, s_k, offset=0, window=0, padding=None):
    """The shape of transformers 5.17's in-graph mask code."""
    q_idx = (torch.arange(s_q) + offset)[None, None, :, None]
    kv_idx = torch.arange(s_k)[None, None, None, :]
    mask = kv_idx <= q_idx
    if window:
        mask = mask & (kv_idx > q_idx - window)
    if padding is not None:
        batch = torch.arange(padding.shape[0])[:, None, None, None]
        mask = mask & padding[batch, kv_idx]
    return mask


def test_sdpa_with_in_graph_mask_and_repeat_kv_is_rewritten():
    def attend(q, k, v, padding):
        mask = _causal_mask(q.shape[2], k.shape[2], offset=k.shape[2] - q.shape[2], window=3,
                            padding=padding)
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)

    q, k, v = qkv(s_q=4, s_k=6)
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, :2] = False
    out, ref, result = compile_and_run(attend, q, k, v, padding)
    (rewrite,) = result.context.rewrites
    assert rewrite.model_window == 3 and rewrite.stripped_repeat_kv
    assert "torch._C._nn.scaled_dot_product_attention" not in result.ops_after
    assert result.ops_after["torch.ops.ihip.attention.default"] == 1
    # The [B, 1, S_Q, S_K] mask is gone: no comparison of index vectors is left in the graph.
    assert not any(op in result.ops_after for op in ("_operator.le", "_operator.gt"))
    torch.testing.assert_close(out, ref)


def test_is_causal_with_enable_gqa_is_rewritten():
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out, ref, result = compile_and_run(attend, *qkv())
    assert len(result.context.rewrites) == 1
    torch.testing.assert_close(out, ref)


def test_skips_bidirectional_attention():
    out, ref, result = compile_and_run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                       *qkv(kv_heads=4))
    assert not result.context.rewrites
    (skip,) = result.context.skips
    assert "bidirectional" in skip.reason
    torch.testing.assert_close(out, ref)


def test_skips_cross_attention():
    def cross(x, encoder_states, wq, wk, wv):
        b, s, _ = x.shape
        q = (x @ wq).view(b, s, 2, 8).transpose(1, 2)
        k = (encoder_states @ wk).view(b, -1, 2, 8).transpose(1, 2)
        v = (encoder_states @ wv).view(b, -1, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)]
    args += [torch.randn(16, 16, generator=g) for _ in range(3)]
    out, ref, result = compile_and_run(cross, *args)
    assert not result.context.rewrites
    assert "cross-attention" in result.context.skips[0].reason
    torch.testing.assert_close(out, ref)


def test_skips_arbitrary_additive_mask():
    def attend(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v = qkv(kv_heads=4)
    out, ref, result = compile_and_run(attend, q, k, v, torch.randn(2, 1, 6, 6))
    assert not result.context.rewrites
    assert "graph input" in result.context.skips[0].reason
    torch.testing.assert_close(out, ref)


def test_skips_computed_mask_that_is_not_causal():
    def attend(q, k, v):
        kv_idx = torch.arange(6)[None, None, None, :]
        q_idx = torch.arange(6)[None, None, :, None]
        mask = (kv_idx <= q_idx) & (kv_idx % 2 == 0)  # causal, but every other key only
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out, ref, result = compile_and_run(attend, *qkv(kv_heads=4))
    assert not result.context.rewrites
    assert "unsupported op" in result.context.skips[0].reason
    torch.testing.assert_close(out, ref)


def test_skips_dropout():
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    q, k, v = qkv(kv_heads=4)
    backend_result = compile_and_run(lambda *a: attend(*a) * 0, q, k, v)[2]
    assert not backend_result.context.rewrites
    assert "dropout" in backend_result.context.skips[0].reason


def test_skips_eager_attention_whose_weights_are_returned():
    def eager(q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.5 + torch.where(
            _causal_mask(6, 6), torch.tensor(0.0), torch.finfo(torch.float32).min)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.matmul(weights, v), weights

    _out, _ref, result = compile_and_run(eager, *qkv(kv_heads=4))
    assert not result.context.rewrites
    assert "more than once" in result.context.skips[0].reason


def test_eager_attention_with_softcap_is_rewritten():
    def eager(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.5
        scores = torch.tanh(scores / 20.0) * 20.0
        mask = torch.where(_causal_mask(6, 6), torch.tensor(0.0), torch.finfo(torch.float32).min)
        weights = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=0.0, training=False)
        return torch.matmul(weights, v)

    out, ref, result = compile_and_run(eager, *qkv())
    (rewrite,) = result.context.rewrites
    assert rewrite.pattern == "eager" and rewrite.softcap == 20.0 and rewrite.scale == 0.5
    torch.testing.assert_close(out, ref)


def test_hf_encoder_is_left_dense():
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out, ref, result = compile_and_run(
            lambda i, m: model(input_ids=i, attention_mask=m).last_hidden_state, ids, mask)
    assert not result.context.rewrites
    assert len(result.context.skips) == 2
    assert all("causal" in s.reason for s in result.context.skips), result.context.skips
    torch.testing.assert_close(out, ref)
