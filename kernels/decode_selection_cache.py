"""Mask caching across decode steps: each pruning stage's output is reused until its refresh step.

The selection barely changes from one generated token to the next (InfiniteHiP §3, "decode"), so
stage i is recomputed only every ``refresh_intervals[i]`` steps, restarting from the cached output
of stage i - 1 (``select_blocks(start_stage=i, candidates=...)``); recomputing a stage recomputes
every later one. Keys appended since stage 0 last ran were never candidates, so attention widens
its sliding window by that many tokens (``extra_window``): new tokens fall in the window.

State is per layer and per sequence batch, held by an owner: the offloaded KV store of a cache, or
``DENSE_PATH_STATES`` for keys that live in the graph (DynamicCache). It lives outside any graph,
in the op's Python side, so nothing is recompiled per step. A call continues the previous state
only when it is the next decode step of the same sequences (S_K grew by exactly one, same batch,
same schedule, and for keys in memory the same first key); anything else (a prefill, a new
prompt) starts over from stage 0, so a stale selection never leaks into another sequence; the op
also drops a layer's state at every call with several queries (a prefill).

With RoPE renumbering and keys in the graph, the attention of a cached step reads the blocks'
sinks and selected keys from a copy made when they were selected, already renumbered
(``attend_positioned``; ``positioned_kv_ref`` says why): ~9.4 MB per layer at Llama-3.1-8B's
shape and the default budget (2304 keys, 8 KV heads, d 128, bf16, K and V).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.positioned_decode_ref import positioned_decode_ref
from ihip_compile.kernels.positioned_kv_ref import PositionedKV, position_selected_kv_ref
from ihip_compile.kernels.selection_scope import fold_heads, fold_inputs, per_group, unfold_heads
from ihip_compile.kernels.prune_stage_ref import DEFAULT_FIRST_PROBES
from ihip_compile.kernels.sparse_attention import (
    attend_selected_blocks, check_attention_inputs, pruning_rope_mode,
)


@dataclass
class SelectionState:
    """Cached stage outputs of one layer: stages[i] is [B, NQB, keep_i / chunk_i] chunk starts."""

    blocks: torch.Tensor
    stages: list[torch.Tensor]
    ages: list[int]  # decode steps since stage i was computed
    s_k: int  # keys at the last step
    stage0_s_k: int  # keys when stage 0 last ran: later keys are covered by the window
    schedule: tuple[int, ...]
    fingerprint: torch.Tensor | None = None  # first key of each row: tells sequences apart
    settings: tuple = ()  # the selection's settings (budgets, probes...): another set starts over
    # The blocks' sinks and selected keys gathered and renumbered for the attention
    # (positioned_kv_ref), made at the first step that attends them; dropped with the blocks.
    positioned: PositionedKV | None = None


@dataclass
class SelectionStates:
    """Selection states of one owner (one sequence batch), by layer; with refresh statistics."""

    by_layer: dict[int, SelectionState] = field(default_factory=dict)
    stage_runs: dict[int, list[int]] = field(default_factory=dict)  # layer -> runs per stage
    steps: dict[int, int] = field(default_factory=dict)  # layer -> decode steps served
    # Key count of the decode step whose sequence a fingerprint comparison has confirmed: the
    # other layers of that step skip theirs (each comparison is a device-to-host sync).
    confirmed_s_k: int | None = None

    def forget(self, layer: int | None = None) -> None:
        """Drop cached selections (of one layer, or all): the next step starts from stage 0."""
        if layer is None:
            self.by_layer.clear()
        else:
            self.by_layer.pop(layer, None)


# Keys held by the graph (DynamicCache): one owner per process, keyed by layer.
DENSE_PATH_STATES = SelectionStates()

# run_stages(start_stage, candidates or None) -> (blocks [B, NQB, TOPK], stages start_stage..)
RunStages = Callable[[int, "torch.Tensor | None"], "tuple[torch.Tensor, list[torch.Tensor]]"]


def first_stage_to_run(state: SelectionState | None, s_k: int, batch: int,
                       refresh_intervals: tuple[int, ...], settings: tuple = ()) -> int:
    """Index of the first stage to recompute at this step; ``len(refresh_intervals)``: none.
    (``state`` is of this step's sequence: ``cached_selection`` checks that.)"""
    if (state is None or s_k != state.s_k + 1 or state.schedule != tuple(refresh_intervals)
            or state.blocks.shape[0] != batch or state.settings != settings):
        return 0
    for i, (age, interval) in enumerate(zip(state.ages, refresh_intervals)):
        if age + 1 >= interval:
            return i
    return len(refresh_intervals)


def cached_selection(states: SelectionStates, layer: int, s_k: int, batch: int,
                     refresh_intervals: tuple[int, ...], run_stages: RunStages,
                     fingerprint: torch.Tensor | None = None, settings: tuple = ()):
    """Blocks for this decode step and the extra window tokens, recomputing only due stages.

    ``fingerprint`` (e.g. the first key of each row) must match the previous step's for the
    state to be reused, telling apart sequences of one shared owner (compared, a device sync, by
    the first layer of a step that continues a state; the step's other layers trust it); so must
    ``settings`` (hashable: whatever else shapes the selection, e.g. budgets), so that a layer
    served under other settings never reuses stages selected under the old ones. Returns
    ``(blocks [B, NQB, TOPK] int32, extra_window_tokens)``.
    """
    refresh_intervals = tuple(int(i) for i in refresh_intervals)
    state = states.by_layer.get(layer)
    if state is None or s_k != state.s_k + 1:
        states.confirmed_s_k = None  # not a continuation: no layer may trust an earlier check
    elif fingerprint is not None and not _sequence_confirmed(states, state, s_k, fingerprint):
        state = None
    start = first_stage_to_run(state, s_k, batch, refresh_intervals, settings)
    n = len(refresh_intervals)
    runs = states.stage_runs.get(layer)
    if runs is None or len(runs) != n:  # first step, or a layer served earlier with another schedule
        runs = states.stage_runs[layer] = [0] * n
        states.steps[layer] = 0
    if start == n:
        continue_cached(states, layer, state, s_k)
        return state.blocks, s_k - state.stage0_s_k
    states.steps[layer] = states.steps.get(layer, 0) + 1
    blocks, new_stages = run_stages(start, state.stages[start - 1] if start else None)
    if len(new_stages) != n - start:
        raise ValueError(f"run_stages returned {len(new_stages)} stages, expected {n - start}")
    for i in range(start, n):
        runs[i] += 1
    if start == 0:
        state = SelectionState(blocks, list(new_stages), [0] * n, s_k, s_k, refresh_intervals,
                               None if fingerprint is None else fingerprint.clone(), settings)
        states.by_layer[layer] = state
    else:
        state.stages[start:] = new_stages
        state.ages = [a + 1 for a in state.ages[:start]] + [0] * (n - start)
        state.blocks, state.s_k, state.positioned = blocks, s_k, None
    return blocks, s_k - state.stage0_s_k


def continue_cached(states: SelectionStates, layer: int, state: SelectionState, s_k: int) -> None:
    """Count a decode step of ``s_k`` keys that ``state``'s cached stages serve whole (no stage
    due: ``first_stage_to_run`` returned the number of stages)."""
    states.steps[layer] = states.steps.get(layer, 0) + 1
    state.ages = [a + 1 for a in state.ages]
    state.s_k = s_k


def _same_fingerprint(stored: torch.Tensor | None, fingerprint: torch.Tensor) -> bool:
    return (stored is not None and stored.shape == fingerprint.shape
            and torch.equal(stored, fingerprint))


def _sequence_confirmed(states: SelectionStates, state: SelectionState, s_k: int,
                        fingerprint: torch.Tensor) -> bool:
    """Whether ``state``, which this decode step continues, is of this step's sequence. The
    first layer of the step compares fingerprints; the layers of one forward share the sequence,
    so the others trust its answer. A mismatch is another sequence: every layer's cached
    selection is dropped, and each starts over from stage 0."""
    if states.confirmed_s_k == s_k:
        return True
    if _same_fingerprint(state.fingerprint, fingerprint):
        states.confirmed_s_k = s_k
        return True
    states.forget()
    return False


def reuse_ratio(states: SelectionStates) -> dict[int, list[float]]:
    """Per layer, per stage: fraction of decode steps served without recomputing the stage."""
    return {
        layer: [1.0 - r / max(states.steps.get(layer, 0), 1) for r in runs]
        for layer, runs in sorted(states.stage_runs.items())
    }


def cached_decode_blocks(q, k, q_positions, *, layer: int, refresh_intervals, window_tokens: int,
                         states: SelectionStates = DENSE_PATH_STATES, keys_for_stage=None,
                         **select_args):
    """``select_blocks`` for one decode step, with mask caching.

    q [B, H, 1, D], k [B, H_KV, S_K, D], one block list per sequence (``cached_sparse_decode``
    folds the selection scope into sequences); ``select_args`` are select_blocks' keyword arguments
    other than window_tokens/start_stage/candidates/return_stages. ``keys_for_stage(start,
    candidates)``, when given, returns the keys to score from (the offloaded cache fills them on
    demand); otherwise ``k`` is used. Returns ``(blocks [B, 1, TOPK] int32, window_tokens to
    attend with)``.
    """
    def run_stages(start, candidates):
        keys = k if keys_for_stage is None else keys_for_stage(start, candidates)
        if isinstance(keys, BlockMajorKeys) and start + 1 < len(refresh_intervals):
            # Keys read in host memory serve only this stage. The later stages' candidates are
            # then asked for through ``keys_for_stage`` (the offloaded cache's pruning bank),
            # where their own refreshes will find them again instead of reading host memory.
            _, first = select_blocks(q, keys, q_positions, window_tokens=window_tokens,
                                     start_stage=start, end_stage=start + 1,
                                     candidates=candidates, return_stages=True, **select_args)
            blocks, later = run_stages(start + 1, first[0])
            return blocks, first + later
        return select_blocks(q, keys, q_positions, window_tokens=window_tokens, start_stage=start,
                             candidates=candidates, return_stages=True, **select_args)


    # Keys in memory have no owner object: the first key tells one sequence from another (one
    # small comparison per step). The offloaded store is itself the owner of one sequence batch.
    fingerprint = k[:, :, 0] if keys_for_stage is None else None
    blocks, extra = cached_selection(states, layer, k.shape[2], q.shape[0],
                                     tuple(refresh_intervals), run_stages, fingerprint,
                                     _settings(window_tokens, select_args))
    return blocks, window_tokens + extra


def _settings(window_tokens: int, select_args: dict) -> tuple:
    """The scalar selection arguments as a hashable key (tensors such as inv_freq are model
    facts, fixed per layer)."""
    plain = {name: tuple(v) if isinstance(v, (list, tuple)) else v
             for name, v in select_args.items() if not isinstance(v, torch.Tensor)}
    return (window_tokens, *sorted(plain.items()))


def cached_sparse_decode(q, k, v, q_positions, *, layer: int, refresh_intervals, scale: float,
                         softcap: float = 0.0, block_size_q: int = 64, sink_tokens: int = 256,
                         window_tokens: int = 1024, selected_tokens: int = 2048,
                         stage_chunks=(256, 32, 8), stage_keeps=(32768, 8192, 2048),
                         pruning_rope: int = 0, remap: bool = False, inv_freq=None,
                         rotary_dim: int = 0, rope_layout: int = 0, use_triton: bool = False,
                         states: SelectionStates = DENSE_PATH_STATES, keys_for_stage=None,
                         kv_for_attention=None, first_probes: int = DEFAULT_FIRST_PROBES,
                         exact_probe_blocks: int = 0, first_stage_blocks: int = 1,
                         per_kv_head: bool = False, attend=None):
    """Sparse decode (S_Q == 1) with the selection cached across steps: the decode branch of
    ``sparse_attention`` with ``select_blocks`` replaced by ``cached_decode_blocks``.

    ``kv_for_attention(blocks [B, G, 1, TOPK], window_tokens)``, when given, returns the
    (k, v) to attend (the offloaded cache fills the attended blocks); otherwise ``k``, ``v`` are
    used. ``keys_for_stage`` gets candidates as [B, G, NQB, N]. G is 1 (one selection per
    layer) or H_KV (``per_kv_head``), ``selection_scope.py``. ``attend(q, k, v, blocks, pos,
    common)``, when given, attends the selected blocks of the folded sequences instead of
    ``attend_selected_blocks`` (the offloaded cache replays a CUDA graph, ``decode_step_graph``).

    On the Triton path every step splits its key list as for the widest window it can have
    before stage 0 runs again (``window_tokens`` plus stage 0's refresh interval), so that the
    steps between refreshes launch alike.
    """
    check_attention_inputs(q, k, v, q_positions)
    if remap and not (rope_layout != 0 and inv_freq is not None and rotary_dim > 0):
        remap = False  # as sparse_attention: without RoPE, positions mean nothing to the scores
    b = q.shape[0]
    q, k, v, pos, groups = fold_inputs(q, k, v, q_positions, per_kv_head)
    if keys_for_stage is not None:
        keys_for_stage = _folded_keys_for_stage(keys_for_stage, b, groups)
    rope_args = dict(inv_freq=inv_freq, rotary_dim=rotary_dim, rope_layout=rope_layout)
    blocks, window = cached_decode_blocks(
        q, k, pos, layer=layer, refresh_intervals=refresh_intervals, window_tokens=window_tokens,
        states=states, keys_for_stage=keys_for_stage, block_size_q=block_size_q,
        sink_tokens=sink_tokens, selected_tokens=selected_tokens, stage_chunks=stage_chunks,
        stage_keeps=stage_keeps, rope_mode=pruning_rope_mode(pruning_rope, remap),
        use_triton=use_triton, first_probes=first_probes,
        exact_probe_blocks=exact_probe_blocks, first_stage_blocks=first_stage_blocks,
        **rope_args,
    )
    if kv_for_attention is not None:
        k, v = kv_for_attention(per_group(blocks, b), window)
        k, v = fold_heads(k, groups), fold_heads(v, groups)
    common = dict(scale=scale, sink_tokens=sink_tokens, window_tokens=window,
                  block_size_k=stage_chunks[-1], softcap=softcap, remap=remap, **rope_args)
    if use_triton:
        common["max_window_tokens"] = window_tokens + int(refresh_intervals[0])
    if remap and kv_for_attention is None:
        out = attend_positioned(q, k, v, pos, states.by_layer[layer], use_triton, common)
    elif attend is not None:
        out = attend(q, k, v, blocks, pos, common)
    else:
        out = attend_selected_blocks(q, k, v, blocks, pos, block_size_q, use_triton, common)
    return unfold_heads(out, b)


def attend_positioned(q, k, v, pos, state: SelectionState, use_triton: bool, common: dict):
    """Renumbered decode attention of ``state``'s blocks from their positioned keys, positioning
    them at the first step that attends them (``positioned_kv_ref``: a cached step then reads
    contiguous rows and rotates no key)."""
    if use_triton:
        from ihip_compile.kernels.positioned_decode import positioned_decode as decode
        from ihip_compile.kernels.positioned_kv import position_selected_kv as position
    else:
        decode, position = positioned_decode_ref, position_selected_kv_ref
    rope = {name: common[name] for name in ("inv_freq", "rotary_dim", "rope_layout")}
    shared = dict(sink_tokens=common["sink_tokens"], window_tokens=common["window_tokens"], **rope)
    if state.positioned is None or not state.positioned.matches(k.shape[2], shared["sink_tokens"]):
        state.positioned = position(k, v, state.blocks, pos, block_size_k=common["block_size_k"],
                                    **shared)
    return decode(q, k, v, state.positioned, pos, scale=common["scale"],
                  softcap=common["softcap"], **shared)


def _folded_keys_for_stage(keys_for_stage, batch: int, groups: int):
    """The caller's ``keys_for_stage`` speaks [B, G, ...]; the selection runs per sequence."""
    def folded(start, candidates):
        if candidates is not None:
            candidates = per_group(candidates, batch)
        return fold_heads(keys_for_stage(start, candidates), groups)
    return folded
