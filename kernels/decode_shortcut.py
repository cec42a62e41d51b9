"""The offloaded decode op's first look at a step: replay the last one when nothing else changed.

Between refreshes a decode step's GPU work is one graph replay (``decode_step_graph``), but the
ordinary path to it (the store lookup, the scratch, folding the inputs, the selection cache's
schedule, the bank plan, the launch arguments) took 0.38 ms of host time per layer under
cProfile even with the graph replaying its kernels, against ~0.03 ms of GPU work at 1M keys
(``reports/bench/decode_step_graphs/``). A step that attends in the bank's slots
through the graph arms this shortcut (``arm``); the layer's next call takes it (``take``) when
it continues that step exactly:
    the same op arguments, ``inv_freq`` and RoPE remapping decision (``op_signature``)
    one key more, with the armed step's selection state and bank plan still in place
    no pruning stage due (``first_stage_to_run``)
    the window within the blocks the plan holds, no slot changed hands (``still_serves``)
It records what the ordinary path would have (the step counted and the stages aged,
``continue_cached``; the blocks' bank hits, ``count_resident``), then replays the layer's graph.
Any other step takes the ordinary path, which arms again. The same test and record serve a
whole decode step replayed as one graph (``AttentionHook``, ``step_capture``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ihip_compile.kernels.decode_selection_cache import (
    SelectionState, continue_cached, first_stage_to_run,
)
from ihip_compile.kernels.decode_step_graph import DecodeStepGraph
from ihip_compile.kernels.resident_blocks import ResidentBlocks, window_first_key
from ihip_compile.kernels.selection_scope import per_group, unfold_heads
from ihip_compile.kernels.step_capture import LayerHook


@dataclass
class ArmedStep:
    """The last step of a layer that replayed its graph, as the shortcut compares it."""

    signature: tuple
    state: SelectionState
    plan: ResidentBlocks
    s_k: int
    window_tokens: int
    max_window_tokens: int
    sink_tokens: int


def op_signature(args: dict, inv_freq, s_k: int) -> tuple:
    """The op's scalar arguments (its sparse-path predicate aside), where ``inv_freq`` lies
    (the graph reads it there) and whether RoPE is remapped at ``s_k`` keys."""
    remap_beyond = args.get("remap_beyond_tokens", -1)
    return (tuple(a for n, a in args.items() if n != "sparse_path"),
            None if inv_freq is None else inv_freq.data_ptr(), 0 <= remap_beyond < s_k)


def arm(store, layer: int, signature: tuple, s_k: int, window_tokens: int,
        common: dict) -> None:
    """Arm the shortcut after an ordinary decode step of ``layer`` that replayed its graph
    with ``common`` (``sparse_decode``'s keywords); ``window_tokens``: the op's window, before
    the selection cache widens it."""
    store.armed_steps[layer] = ArmedStep(
        signature, store.selection_states.by_layer[layer], store.resident_plans[layer], s_k,
        window_tokens, common["max_window_tokens"], common["sink_tokens"])


def take(store, layer: int, q, q_positions, s_k: int, signature: tuple) -> torch.Tensor | None:
    """This decode step's attention [B, H, 1, D] by the shortcut, or None: not a continuation
    of the armed step (the ordinary path runs)."""
    armed = store.armed_steps.get(layer)
    graph: DecodeStepGraph | None = store.step_graphs.get(layer)
    if (armed is None or graph is None or signature != armed.signature
            or not graph.fits(q, q_positions)):
        return None
    step = steady_step(store, layer, s_k)
    if step is None:
        return None
    step.account(s_k)
    out = graph.replay(q, q_positions, step.state.blocks, s_k - step.window)
    return unfold_heads(out, q.shape[0])


@dataclass
class SteadyStep:
    """What the shortcut found for a step that continues the armed one."""

    store: object
    layer: int
    armed: ArmedStep
    state: SelectionState
    plan: ResidentBlocks
    bank: object
    window: int  # the widened window of this step

    def account(self, s_k: int) -> None:
        """Record what the ordinary path would have: the step counted and the stages aged
        (``continue_cached``), the blocks' bank hits, the armed step moved on."""
        continue_cached(self.store.selection_states, self.layer, self.state, s_k)
        self.bank.count_resident(self.plan.counted)
        self.armed.s_k = s_k


def steady_step(store, layer: int, s_k: int) -> SteadyStep | None:
    """The armed step of ``layer`` continued at ``s_k`` keys, or None when this step cannot
    repeat it (see the module docstring); host state only, nothing is changed."""
    armed = store.armed_steps.get(layer)
    if armed is None or s_k != armed.s_k + 1:
        return None
    states = store.selection_states
    state, plan = states.by_layer.get(layer), store.resident_plans.get(layer)
    if state is not armed.state or plan is not armed.plan or state.s_k != armed.s_k:
        return None
    n_stages = len(state.schedule)
    if first_stage_to_run(state, s_k, state.blocks.shape[0], state.schedule,
                          state.settings) != n_stages:
        return None
    window = armed.window_tokens + s_k - state.stage0_s_k
    first = window_first_key(s_k - 1, window, min(armed.sink_tokens, s_k))
    bank = store.attention_bank(layer)
    blocks = (first // store.block_tokens, (s_k - 1) // store.block_tokens)
    selection = per_group(state.blocks, store.batch)  # as the bank plan saw it
    if window > armed.max_window_tokens or not plan.still_serves(selection, blocks, bank):
        return None
    return SteadyStep(store, layer, armed, state, plan, bank, window)


class AttentionHook(LayerHook):
    """The shortcut of one layer as a hook of a whole-step graph (``step_capture``)."""

    kind = "attention"

    def __init__(self, store, layer: int, graph: DecodeStepGraph, signature: tuple,
                 remap_beyond: int):
        super().__init__(store, layer, graph)
        self.remapped, self.remap_beyond = signature[2], remap_beyond
        self.step: SteadyStep | None = None  # found by ``steady``, dropped by ``account``

    def steady(self, s_k: int) -> bool:
        store, graph = self.store, self.graph
        if (store is None or graph is None or store.step_graphs.get(self.layer) is not graph
                or graph.captures != self.captures
                or (0 <= self.remap_beyond < s_k) != self.remapped):
            return False
        self.step = steady_step(store, self.layer, s_k)
        # The graph's buffers already hold this step's blocks and window start.
        return self.step is not None and graph.holds(self.step.state.blocks,
                                                     s_k - self.step.window)

    def prepare(self, s_k: int) -> None:
        """Nothing to set: ``steady`` found the buffers holding this step's blocks."""

    def account(self, s_k: int) -> None:
        self.step.account(s_k)
        self.step = None
        self.graph.replays += 1

    def launch(self, q, q_positions) -> torch.Tensor:
        return unfold_heads(self.graph.launch_on_buffers(q, q_positions), q.shape[0])
