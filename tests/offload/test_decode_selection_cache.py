"""Mask caching across decode steps: refresh schedule, in-memory vs offloaded, bank hit ratio."""

import pytest
import torch

from ihip_compile.kernels.decode_selection_cache import (
    DENSE_PATH_STATES, SelectionStates, cached_decode_blocks, cached_selection, reuse_ratio,
)
from ihip_compile.kernels.selection_scope import fold_heads, fold_positions, unfold_heads
from ihip_compile.kernels.prune_stage_ref import PRUNE_ROPE_RELATIVE
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
from ihip_compile.offload import OffloadedCache
from ihip_compile.kernels import ops  # noqa: F401

SELECT = dict(block_size_q=64, sink_tokens=8, selected_tokens=32, stage_chunks=[32, 8],
              stage_keeps=[64, 32])
WINDOW = 16
OP_ARGS = dict(dense_below_tokens=64, window_tokens=WINDOW, **SELECT)


def _recorder(n_stages):
    calls = []

    def run_stages(start, candidates):
        calls.append(start)
        blocks = torch.full((1, 1, 2), len(calls), dtype=torch.int32)
        return blocks, [torch.zeros(1, 1, 1, dtype=torch.int32)] * (n_stages - start)

    return calls, run_stages


def test_each_stage_reruns_on_its_interval_and_later_stages_follow():
    states, (calls, run) = SelectionStates(), _recorder(3)
    extras = []
    for step in range(12):
        _, extra = cached_selection(states, 0, 100 + step, 1, (8, 4, 2), run)
        extras.append(extra)
    # step 0: stage 0; stage 2 every 2 steps, stage 1 every 4, stage 0 again at step 8
    assert calls == [0, 2, 1, 2, 0, 2]
    assert extras == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert reuse_ratio(states)[0] == [1 - 2 / 12, 1 - 3 / 12, 1 - 6 / 12]


def test_a_new_sequence_or_a_prefill_starts_from_stage_zero():
    states, (calls, run) = SelectionStates(), _recorder(2)
    cached_selection(states, 0, 50, 1, (4, 2), run)
    cached_selection(states, 0, 51, 1, (4, 2), run)  # continues: nothing due
    cached_selection(states, 0, 30, 1, (4, 2), run)  # shorter: another sequence
    cached_selection(states, 0, 31, 2, (4, 2), run)  # other batch
    cached_selection(states, 1, 32, 2, (4, 2), run)  # other layer: own state
    assert calls == [0, 0, 0, 0]


def _step(states, s_k, first_key, run, layers=3):
    for layer in range(layers):
        cached_selection(states, layer, s_k, 1, (4, 2), run,
                         fingerprint=torch.full((1, 2), float(first_key)))


def test_another_sequence_continuing_the_length_starts_every_layer_over(monkeypatch):
    """A sequence is told apart by its fingerprint once per step: the first layer compares
    (a device sync on the GPU), the others trust it; a mismatch restarts every layer."""
    from ihip_compile.kernels import decode_selection_cache as cache

    compared = []
    same = cache._same_fingerprint
    monkeypatch.setattr(cache, "_same_fingerprint", lambda *a: compared.append(1) or same(*a))
    states, (calls, run) = SelectionStates(), _recorder(2)
    _step(states, 50, 1.0, run)
    _step(states, 51, 1.0, run)  # the same sequence: nothing due in any layer
    assert calls == [0, 0, 0] and len(compared) == 1
    _step(states, 52, 2.0, run)  # another sequence whose length continues the first's
    assert calls == [0, 0, 0, 0, 0, 0] and len(compared) == 2
    _step(states, 53, 2.0, run)  # that one continues: its own selections are reused
    assert len(calls) == 6 and len(compared) == 3


def test_a_layer_served_again_with_another_schedule_starts_over():
    # One process may run models with different stage counts; layer indices repeat between them.
    states = SelectionStates()
    cached_selection(states, 0, 50, 1, (4, 2), _recorder(2)[1])
    calls, run = _recorder(3)
    cached_selection(states, 0, 51, 1, (8, 4, 2), run)
    assert calls == [0]
    assert reuse_ratio(states)[0] == [0.0, 0.0, 0.0]


def _decode_inputs(s_k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g),
            torch.randn(1, 2, 1, 16, generator=g))


def _cached_prompt(prompt, capacity, bank_tokens, seed, device="cpu"):
    """A random prompt's K/V [1, 2, prompt, 16], and an OffloadedCache holding them."""
    torch.manual_seed(seed)
    keys = torch.randn(1, 2, prompt, 16, device=device)
    values = torch.randn(1, 2, prompt, 16, device=device)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=capacity,
                           dtype=torch.float32, device=device, gpu_cache_tokens=bank_tokens)
    cache.update(keys, values, 0)
    return keys, values, cache


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_offloaded_sparse_decode_matches_in_memory_path_with_caching(per_kv_head):
    prompt = 160
    keys, values, cache = _cached_prompt(prompt, capacity=256, bank_tokens=128, seed=0)
    in_memory = SelectionStates()
    refresh = [4, 2]
    for step in range(10):
        q, k_new, v_new = _decode_inputs(prompt + step, seed=step)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        s_k = keys.shape[2]
        pos = torch.tensor([s_k - 1])
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, layer=0,
                                       scale=0.25, refresh_intervals=refresh,
                                       per_kv_head=per_kv_head, **OP_ARGS)
        # The op folds its selection scope into sequences: the layer, or each KV head.
        groups = 2 if per_kv_head else 1
        q_seq, k_seq, v_seq = (fold_heads(t, groups) for t in (q, keys, values))
        pos_seq = fold_positions(pos.view(1, 1), groups)
        blocks, window = cached_decode_blocks(q_seq, k_seq, pos_seq, layer=0,
                                              refresh_intervals=refresh, window_tokens=WINDOW,
                                              states=in_memory, **SELECT)
        want = unfold_heads(sparse_decode_ref(q_seq, k_seq, v_seq, blocks, pos_seq, scale=0.25,
                                              sink_tokens=8, window_tokens=window), 1)
        assert torch.equal(got, want), f"step {step}"
        in_memory_op = torch.ops.ihip.attention(q, keys, values, pos, None, None, layer=0,
                                                scale=0.25, refresh_intervals=refresh,
                                                per_kv_head=per_kv_head, **OP_ARGS)
        assert torch.equal(in_memory_op, want), f"step {step}"
    ratios = cache.hit_ratios()
    assert ratios["attention"] > 0.5 and ratios["pruning"] is not None
    assert reuse_ratio(cache.store.selection_states)[0] == reuse_ratio(in_memory)[0]


def test_between_refreshes_attention_reads_hit_the_bank():
    torch.manual_seed(1)
    prompt = 400
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=512,
                           dtype=torch.float32, gpu_cache_tokens=256)
    cache.update(torch.randn(1, 2, prompt, 16), torch.randn(1, 2, prompt, 16), 0)
    bank = None
    for step in range(16):
        q, k_new, v_new = _decode_inputs(prompt + step, seed=step)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        pos = torch.tensor([prompt + step])
        torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, layer=0, scale=0.25,
                                 refresh_intervals=[16, 8], **OP_ARGS)
        if step == 0:
            bank = cache.store._banks[0]["attention"]
            first_hits, first_misses = bank.hits, bank.misses
    hits, misses = bank.hits - first_hits, bank.misses - first_misses
    assert hits / (hits + misses) >= 0.95, (hits, misses)


def test_in_memory_state_is_not_reused_for_another_sequence_of_the_next_length():
    states = SelectionStates()
    torch.manual_seed(2)
    q = torch.randn(1, 4, 1, 16)
    for seed, s_k in ((0, 160), (1, 161)):  # two unrelated sequences, lengths one apart
        keys = torch.randn(1, 2, s_k, 16, generator=torch.Generator().manual_seed(seed))
        cached_decode_blocks(q, keys, torch.tensor([[s_k - 1]]), layer=0,
                             refresh_intervals=[4, 2], window_tokens=WINDOW, states=states,
                             **SELECT)
    assert states.stage_runs[0] == [2, 2]


def test_state_is_not_reused_when_the_selection_settings_change():
    # Same sequence, next length, same schedule: only the budget differs between the two steps.
    states = SelectionStates()
    torch.manual_seed(3)
    q = torch.randn(1, 4, 1, 16)
    keys = torch.randn(1, 2, 161, 16)
    for s_k, selected in ((160, 32), (161, 16)):
        blocks, _ = cached_decode_blocks(q, keys[:, :, :s_k], torch.tensor([[s_k - 1]]), layer=0,
                                         refresh_intervals=[4, 2], window_tokens=WINDOW,
                                         states=states, **{**SELECT, "selected_tokens": selected})
    assert states.stage_runs[0] == [2, 2]
    assert (blocks >= 0).sum() <= 16 // 8


@pytest.mark.parametrize("storage", [torch.float32, torch.float8_e4m3fn])
def test_steps_attending_the_same_blocks_read_no_bank(monkeypatch, storage):
    # Between refreshes the attended blocks repeat; such a step reads nothing through the bank:
    # decode attends the bank's slots in place (FP8 storage widened as read). Poisoning the shared
    # scratch after every step proves nothing stale is attended; equality with the in-memory op
    # on the stored keys proves the right keys are, also after the window enters a new block
    # (steps cross two block boundaries).
    from ihip_compile.kernels import offloaded_attention
    from ihip_compile.kernels.block_bank import BlockBank

    reads = []
    for method in ("read", "fetch_named"):  # a read, whether it returns the blocks or not
        original = getattr(BlockBank, method)
        monkeypatch.setattr(BlockBank, method, lambda self, *a, _original=original, **k:
                            reads.append(self) or _original(self, *a, **k))
    prompt = 404
    torch.manual_seed(3)
    keys, values = torch.randn(1, 2, prompt, 16), torch.randn(1, 2, prompt, 16)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=512,
                           dtype=torch.float32, device="cpu", gpu_cache_tokens=256,
                           storage_dtype=storage)
    cache.update(keys, values, 0)
    offloaded_attention.scratch("values", cache.store, (1, 2, 512, 16))  # as a prefill leaves it
    keys, values = keys.to(storage).float(), values.to(storage).float()
    for step in range(20):
        q, k_new, v_new = _decode_inputs(prompt + step, seed=10 + step)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        keys = torch.cat([keys, k_new.to(storage).float()], 2)
        values = torch.cat([values, v_new.to(storage).float()], 2)
        pos = torch.tensor([keys.shape[2] - 1])
        args = dict(layer=0, scale=0.25, refresh_intervals=[32, 16], **OP_ARGS)
        hits_before, reads_before = cache.hit_counts()[0]["attention_hits"], len(reads)
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
        want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
        assert torch.equal(got, want), f"step {step}"
        if len(reads) == reads_before:  # served with no read: still counted as hits
            assert cache.hit_counts()[0]["attention_hits"] > hits_before, f"step {step}"
        for buffer in offloaded_attention._SCRATCH.values():
            buffer.fill_(float("nan"))
    # 20 steps: the first reads through the attention bank, as do the two that enter a new
    # window block and the one that refreshes stage 1 (step 16, also a pruning-bank read).
    attention_bank = cache.store.attention_bank(0)
    assert sum(bank is attention_bank for bank in reads) == 4
    # Attending in the slots (FP8 slots too: widened as read) releases the value scratch.
    value_scratch = ("values", cache.store.device, cache.store.dtype)
    assert value_scratch not in offloaded_attention._SCRATCH


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory read by a GPU kernel")
def test_stage_zero_reads_host_keys_in_place_on_cuda_and_matches_in_memory():
    prompt = 300
    keys, values, cache = _cached_prompt(prompt, capacity=400, bank_tokens=128, seed=4,
                                         device="cuda")
    for step in range(6):
        q, k_new, v_new = (t.cuda() for t in _decode_inputs(prompt + step, seed=20 + step))
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        pos = torch.tensor([keys.shape[2] - 1], device="cuda")
        args = dict(layer=0, scale=0.25, refresh_intervals=[2, 1], **OP_ARGS)
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
        want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
        assert torch.equal(got, want), f"step {step}"
    assert cache.hit_counts()[0]["in_place_scans"] == 3  # stage 0 at steps 0, 2, 4


def _remap_args():
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    return inv_freq, dict(remap_beyond_tokens=0, rotary_dim=16, rope_layout=1)


def test_renumbered_cached_steps_attend_positioned_keys_as_sparse_decode():
    """Keys in the graph with RoPE renumbering: each selection is positioned once, at its first
    step, and reused until a stage refresh replaces the blocks; every step equals sparse_decode
    of the step's blocks."""
    from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES

    DENSE_PATH_STATES.forget()
    inv_freq, rope = _remap_args()
    prompt = 160
    torch.manual_seed(4)
    keys, values = torch.randn(1, 2, prompt, 16), torch.randn(1, 2, prompt, 16)
    in_memory, positioned = SelectionStates(), []
    refresh = [4, 2]
    for step in range(8):
        q, k_new, v_new = _decode_inputs(prompt + step, seed=step)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        pos = torch.tensor([keys.shape[2] - 1])
        got = torch.ops.ihip.attention(q, keys, values, pos, None, inv_freq, layer=0, scale=0.25,
                                       refresh_intervals=refresh, **rope, **OP_ARGS)
        positioned.append(DENSE_PATH_STATES.by_layer[0].positioned)
        blocks, window = cached_decode_blocks(
            q, keys, pos.view(1, 1), layer=0, refresh_intervals=refresh, window_tokens=WINDOW,
            states=in_memory, rope_mode=PRUNE_ROPE_RELATIVE, inv_freq=inv_freq, rotary_dim=16,
            rope_layout=1, **SELECT)
        want = sparse_decode_ref(q, keys, values, blocks, pos.view(1, 1), scale=0.25,
                                 sink_tokens=8, window_tokens=window, remap=True,
                                 inv_freq=inv_freq, rotary_dim=16, rope_layout=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    # Stage 1 reruns every 2 steps (0, 2, 4, 6): a new positioning each time, reused in between.
    assert [positioned[i] is positioned[i + 1] for i in range(7)] == [True, False] * 3 + [True]


def test_a_prefill_ends_the_decode_states_of_its_layer():
    from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES

    DENSE_PATH_STATES.forget()
    inv_freq, rope = _remap_args()
    torch.manual_seed(5)
    keys, values = torch.randn(1, 2, 161, 16), torch.randn(1, 2, 161, 16)
    q = torch.randn(1, 4, 1, 16)
    torch.ops.ihip.attention(q, keys[:, :, :160], values[:, :, :160], torch.tensor([159]), None,
                             inv_freq, layer=0, scale=0.25, refresh_intervals=[4, 2], **rope,
                             **OP_ARGS)
    assert 0 in DENSE_PATH_STATES.by_layer
    prefill_q = torch.randn(1, 4, 3, 16)
    torch.ops.ihip.attention(prefill_q, keys[:, :, :3], values[:, :, :3], torch.arange(3), None,
                             inv_freq, layer=0, scale=0.25, refresh_intervals=[4, 2], **rope,
                             **OP_ARGS)
    assert 0 not in DENSE_PATH_STATES.by_layer


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_offloaded_decode_of_two_rows_through_small_banks_matches_the_in_memory_op(per_kv_head,
                                                                                   caplog):
    # Two rows share each bank (their blocks follow one another), and banks smaller than one
    # step's reads keep evicting: every step must still equal the op over K/V in memory, and
    # each bank says once that it is too small, and which option would hold its reads.
    g = torch.Generator().manual_seed(3)
    prompt, batch = 150, 2
    keys = torch.randn(batch, 2, prompt, 16, generator=g)
    values = torch.randn(batch, 2, prompt, 16, generator=g)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=192,
                           batch_size=batch, dtype=torch.float32, gpu_cache_tokens=40)
    cache.update(keys, values, 0)
    args = dict(layer=0, scale=0.25, refresh_intervals=[3, 2], per_kv_head=per_kv_head,
                **OP_ARGS)
    DENSE_PATH_STATES.forget()
    for step in range(8):
        q = torch.randn(batch, 4, 1, 16, generator=g)
        k_new, v_new = torch.randn(2, batch, 2, 1, 16, generator=g)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        pos = torch.full((batch, 1), keys.shape[2] - 1)
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
        want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
        assert torch.equal(got, want), f"step {step}"
    counts = cache.hit_counts()[0]
    assert counts["attention_misses"] > 0 and counts["pruning_misses"] > 0
    warnings = [r.getMessage() for r in caplog.records if "full-length scratch" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "attention bank, which holds 40" in warnings[0] + warnings[1]
    assert "pruning_cache_tokens >= " in warnings[0] + warnings[1]


def _decode_with_keys_in_place(monkeypatch, seed: int, steps: int):
    """Decode steps over a 300-token prompt in an OffloadedCache whose stage 0 reads the host
    keys where they lie (as on CUDA), refreshing stage 0 every 4 steps and stage 1 every 2.
    Yields (step, cache) after each step's offloaded op, then checks its output against the
    in-memory op."""
    from ihip_compile.kernels.host_keys import BlockMajorKeys

    prompt = 300
    keys, values, cache = _cached_prompt(prompt, capacity=400, bank_tokens=256, seed=seed)
    store = cache.store

    def in_place(layer, per_kv_head, probe_stride=0):
        return BlockMajorKeys(store._layer_host(layer)["keys"], store.batch,
                              store.lengths[layer], store.device)

    monkeypatch.setattr(store, "keys_in_place", in_place)
    args = dict(layer=0, scale=0.25, refresh_intervals=[4, 2], **OP_ARGS)
    for step in range(steps):
        q, k_new, v_new = _decode_inputs(prompt + step, seed=10 * seed + step)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        pos = torch.tensor([keys.shape[2] - 1])
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
        yield step, cache
        want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
        assert torch.equal(got, want), f"step {step}"


def test_a_stage_zero_refresh_in_host_memory_admits_the_later_stages_candidates(monkeypatch):
    """Keys read where they lie (as on CUDA) serve stage 0 only: stage 1 of the same refresh
    asks for its candidates through the pruning bank, so stage 1's own refresh finds them
    there."""
    pruning = []
    for _, cache in _decode_with_keys_in_place(monkeypatch, seed=5, steps=4):
        counts = cache.hit_counts()[0]
        pruning.append((counts["pruning_hits"], counts["pruning_misses"]))
    assert pruning[0] == (0, 8)  # stage 0 keeps 2 chunks of 32 keys: 8 blocks, admitted
    assert pruning[2] == (8, 8)  # stage 1's refresh (step 2): the same 8 blocks, all hits


def test_decode_with_host_keys_in_place_needs_no_scratch(monkeypatch):
    """Stage 0 reading host keys in place, the later stages scoring the pruning bank's slots
    and attention reading the attention bank's: no decode step asks for a [B, H_KV, S_K, D]
    scratch, and the one a prefill left is given back."""
    from ihip_compile.kernels import offloaded_attention

    asked = []
    real_scratch = offloaded_attention.scratch
    monkeypatch.setattr(offloaded_attention, "scratch",
                        lambda name, *a: asked.append(name) or real_scratch(name, *a))
    steps = _decode_with_keys_in_place(monkeypatch, seed=6, steps=5)
    for step, cache in steps:  # stage 0 at steps 0 and 4, stage 1 at 0, 2 and 4
        if step == 0:
            assert asked == []
            real_scratch("keys", cache.store, (1, 2, 512, 16))  # as a prefill leaves it
        assert asked == [], f"step {step}"
    store = cache.store
    assert ("keys", store.device, store.dtype) not in offloaded_attention._SCRATCH
    assert cache.hit_counts()[0]["pruning_hits"] > 0


def test_a_later_stage_refresh_scores_the_blocks_stage_one_left_without_reading(monkeypatch):
    """Stage 2 scores chunks of blocks stage 1's read left in the pruning bank: while no read of
    the bank came since, its refresh reads nothing, counts them as hits, and the output stays
    that of the in-memory op. Stage 1's own refresh reads again."""
    three_stages = dict(OP_ARGS, stage_chunks=[64, 16, 8], stage_keeps=[128, 64, 32])
    prompt = 400
    keys, values, cache = _cached_prompt(prompt, capacity=512, bank_tokens=256, seed=8)
    store = cache.store
    reads = []
    for method in ("read_bank_blocks", "fetch_named_bank_blocks"):  # blocks returned or not
        real = getattr(store, method)
        # The decode path passes the bank's kind last.
        monkeypatch.setattr(store, method, lambda *a, _real=real:
                            (reads.append(a[-1]), _real(*a))[1])
    args = dict(layer=0, scale=0.25, refresh_intervals=[8, 4, 2], **three_stages)
    pruning_reads, pruning_hits = [], []
    for step in range(12):  # stage 0 at 0 and 8; stage 1 at 0, 4, 8; stage 2 at every even step
        q, k_new, v_new = _decode_inputs(prompt + step, seed=80 + step)
        keys, values = torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2)
        k_proxy, v_proxy = cache.update(k_new, v_new, 0)
        pos = torch.tensor([keys.shape[2] - 1])
        reads.clear()
        got = torch.ops.ihip.attention(q, k_proxy, v_proxy, pos, None, None, **args)
        pruning_reads.append(reads.count("pruning"))
        pruning_hits.append(cache.hit_counts()[0]["pruning_hits"])
        want = torch.ops.ihip.attention(q, keys, values, pos, None, None, **args)
        assert torch.equal(got, want), f"step {step}"
    # Steps 0 and 8 stream the keys for all stages (off CUDA): steps 2 and 10 then find no read
    # of stage 1's candidates to rely on.
    assert pruning_reads == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert pruning_hits[6] > pruning_hits[5]
