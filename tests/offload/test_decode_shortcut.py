"""The decode shortcut (``decode_shortcut``) on the CPU, with a stand-in for the layer's graph:
it serves exactly the steps that continue the armed one, and records what the ordinary path
records for them."""

import torch

from ihip_compile.kernels import decode_shortcut
from ihip_compile.kernels.decode_selection_cache import reuse_ratio
from ihip_compile.offload import OffloadedCache
from tests.offload.test_decode_selection_cache import OP_ARGS, WINDOW

PROMPT, STEPS, REFRESH = 300, 40, [16, 4]
ARGS = dict(layer=0, scale=0.25, refresh_intervals=REFRESH, **OP_ARGS)


class _StandInGraph:
    """Takes any input; records each replay's window start."""

    def __init__(self):
        self.window_starts = []

    def fits(self, q, q_positions):
        return True

    def replay(self, q, q_positions, blocks, window_start):
        self.window_starts.append(window_start)
        return torch.zeros(q.shape)


def _cache():
    gen = torch.Generator().manual_seed(0)
    cache = OffloadedCache(num_layers=1, kv_heads=2, head_dim=16, max_cache_tokens=512,
                           dtype=torch.float32, device="cpu", gpu_cache_tokens=256)
    cache.update(torch.randn(1, 2, PROMPT, 16, generator=gen),
                 torch.randn(1, 2, PROMPT, 16, generator=gen), 0)
    return cache


def _step_inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen),
            torch.randn(1, 2, 1, 16, generator=gen))


def test_the_shortcut_serves_the_continuing_steps_and_records_like_the_ordinary_path():
    with_shortcut, ordinary = _cache(), _cache()
    graph = _StandInGraph()
    with_shortcut.store.step_graphs[0] = graph
    common = dict(max_window_tokens=WINDOW + REFRESH[0], sink_tokens=OP_ARGS["sink_tokens"])
    served = []
    for step in range(STEPS):
        q, k_new, v_new = _step_inputs(step)
        s_k = PROMPT + step + 1
        pos = torch.tensor([s_k - 1])
        # The op reads the store that last appended to its layer: one cache at a time.
        torch.ops.ihip.attention(q, *ordinary.update(k_new, v_new, 0), pos, None, None, **ARGS)
        proxies = with_shortcut.update(k_new, v_new, 0)
        signature = decode_shortcut.op_signature(ARGS, None, s_k)
        out = decode_shortcut.take(with_shortcut.store, 0, q, pos, s_k, signature)
        served.append(out is not None)
        if out is None:
            torch.ops.ihip.attention(q, *proxies, pos, None, None, **ARGS)
            decode_shortcut.arm(with_shortcut.store, 0, signature, s_k, WINDOW, common)
    # Ordinary: the first step, every stage refresh (steps 4, 8, ...); the window enters a new
    # block at steps 4, 12, ... (key 300 + step), refreshes too. Every other step is served.
    assert served == [step % 4 != 0 for step in range(STEPS)]
    # The window starts where the ordinary path's widened window starts: stage 0 ran at steps
    # 0, 16 and 32, at keys 301, 317, 333.
    stage0_keys = [PROMPT + 1 + 16 * (step // 16) for step in range(STEPS) if step % 4]
    assert graph.window_starts == [keys - WINDOW for keys in stage0_keys]
    assert with_shortcut.hit_counts() == ordinary.hit_counts()
    states, ordinary_states = (c.store.selection_states for c in (with_shortcut, ordinary))
    assert states.stage_runs == ordinary_states.stage_runs
    assert states.steps == ordinary_states.steps
    assert reuse_ratio(states) == reuse_ratio(ordinary_states)


def test_other_arguments_or_a_skipped_step_take_the_ordinary_path():
    cache = _cache()
    cache.store.step_graphs[0] = _StandInGraph()
    common = dict(max_window_tokens=WINDOW + REFRESH[0], sink_tokens=OP_ARGS["sink_tokens"])
    q, k_new, v_new = _step_inputs(0)
    s_k = PROMPT + 1
    torch.ops.ihip.attention(q, *cache.update(k_new, v_new, 0), torch.tensor([s_k - 1]), None,
                             None, **ARGS)
    decode_shortcut.arm(cache.store, 0, decode_shortcut.op_signature(ARGS, None, s_k), s_k,
                        WINDOW, common)
    q, k_new, v_new = _step_inputs(1)
    cache.update(k_new, v_new, 0)
    pos = torch.tensor([s_k])
    other = decode_shortcut.op_signature({**ARGS, "scale": 0.5}, None, s_k + 1)
    assert decode_shortcut.take(cache.store, 0, q, pos, s_k + 1, other) is None
    same = decode_shortcut.op_signature(ARGS, None, s_k + 2)
    assert decode_shortcut.take(cache.store, 0, q, pos, s_k + 2, same) is None  # not the next
    assert decode_shortcut.take(cache.store, 0, q, pos, s_k + 1, same) is not None
