"""How the offloaded decode ops take part in one CUDA graph for a whole decode step.

Between refreshes a decode step over the offloaded cache repeats the same device work, with the
per-layer appends and attentions each replaying a small graph (``append_step_graph``,
``decode_step_graph``) between the model's own segments. What is left per step is host time:
each op's Python, checks and bookkeeping, a replay per piece and the copies between them. A
whole step can instead be one graph (``ihip_compile.decode_step_replay``), provided each op can
say three things, which it does through a *hook*:
    steady(s_k)   whether this step would take the steady path again (no refresh due, same
                  buffers, same bank plan...), asked before the step, from host state only
    prepare(s_k)  what the op would have set in its buffers before its launch (before the
                  replay)
    account(s_k)  the host bookkeeping the op's Python would have done (lengths, ages, counts;
                  after the replay is launched, while the GPU runs it)
    launch(...)   the op's device work on those buffers, while the step is being captured;
                  it changes no host state (a capture that fails leaves everything as it was)
An op reports its hook after a call that took the steady path, or that set it up for the next
step (a refresh that armed it), while a step is observed (``observing``), and None after any
other call; while a step is captured (``capturing``) each op call hands its inputs to the next
hook's ``launch`` instead of running its own path.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Iterator


class LayerHook:
    """The base of the ops' hooks (subclasses define ``kind``, ``steady``, ``prepare``,
    ``account`` and ``launch``, as above). The store and the layer's graph are held weakly, so
    that a whole-step graph keeps neither a dropped cache's host memory nor its graphs alive;
    ``captures`` is the graph's count when the hook was made (a new capture: new buffers)."""

    kind = ""  # "append" or "attention"

    def __init__(self, store, layer: int, graph):
        self._store, self._graph = weakref.ref(store), weakref.ref(graph)
        self.layer = layer
        self.captures = graph.captures

    @property
    def store(self):
        """The HostKVStore the op reads or writes; None once it is dropped."""
        return self._store()

    @property
    def graph(self):
        """The layer's own graph whose buffers the launch uses; None once it is dropped."""
        return self._graph()


class _Observation:
    def __init__(self):
        self.hooks: list[LayerHook | None] = []


class _Capture:
    def __init__(self, hooks: list[LayerHook]):
        self.hooks = hooks
        self.next = 0


_ACTIVE: contextvars.ContextVar[_Observation | _Capture | None] = contextvars.ContextVar(
    "ihip_step_capture", default=None)


@contextlib.contextmanager
def observing() -> Iterator[list[LayerHook | None]]:
    """Collect the hooks of the ops called inside (None for an op that did not take its
    steady path)."""
    observation = _Observation()
    token = _ACTIVE.set(observation)
    try:
        yield observation.hooks
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def capturing(hooks: list[LayerHook]) -> Iterator[None]:
    """Route the op calls inside to ``hooks``' launches, in order."""
    capture = _Capture(hooks)
    token = _ACTIVE.set(capture)
    try:
        yield
        if capture.next != len(hooks):
            raise RuntimeError(f"the captured step called {capture.next} offloaded ops, its "
                               f"last observed step {len(hooks)}")
    finally:
        _ACTIVE.reset(token)


def observe(hook: LayerHook | None) -> None:
    """Report an op call's hook (None: it did not take its steady path) to an observed step."""
    active = _ACTIVE.get()
    if isinstance(active, _Observation):
        active.hooks.append(hook)


def hook_to_launch(kind: str, layer: int) -> LayerHook | None:
    """While a step is captured: the hook that launches this op call's work (``kind``,
    ``layer`` must match what the observed step called at this point); else None."""
    active = _ACTIVE.get()
    if not isinstance(active, _Capture):
        return None
    if active.next >= len(active.hooks):
        raise RuntimeError("the captured step calls more offloaded ops than its observed step")
    hook = active.hooks[active.next]
    if hook.kind != kind or hook.layer != layer:
        raise RuntimeError(f"the captured step calls {kind} of layer {layer} where its observed "
                           f"step called {hook.kind} of layer {hook.layer}")
    active.next += 1
    return hook


def step_lengths(hooks: list[LayerHook]) -> list[int] | None:
    """The key count each hook sees in this step (an attention sees the keys its layer's
    append in the same step adds), or None when some hook would not take its steady path."""
    pending: dict[tuple[int, int], int] = {}
    lengths = []
    for hook in hooks:
        store = hook.store
        if store is None:
            return None
        key = (id(store), hook.layer)
        s_k = store.lengths[hook.layer] + pending.get(key, 0)
        if hook.kind == "append":
            pending[key] = pending.get(key, 0) + 1
            s_k += 1
        if not hook.steady(s_k):
            return None
        lengths.append(s_k)
    return lengths
