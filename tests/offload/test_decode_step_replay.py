"""``StepReplay`` on the CPU: when a folded decode step is observed, captured or replayed.

The offloaded ops take their steady path on CUDA only, so these tests run a stretch with one
stand-in op that speaks the hook protocol (``kernels/step_capture.py``) and a stand-in capture
that replays by running the captured launches again, as a CUDA graph would replay them. The
real capture is tested on a GPU in tests/e2e/test_decode_cuda_graphs.py.
"""

import logging

import pytest
import torch
import torch.fx as fx

from ihip_compile.decode_step_replay import StepReplay
from ihip_compile.kernels import step_capture
from ihip_compile.kernels.step_capture import LayerHook


class Store:
    """Stands in for a HostKVStore: one layer's length, and whether its op is steady."""

    def __init__(self):
        self.lengths = [0]
        self.steady = True
        self.graph = Graph()


class Graph:
    """Stands in for a layer's own graph: its position buffer."""

    captures = 1

    def __init__(self):
        self.start = torch.zeros(1)


class Hook(LayerHook):
    kind = "append"

    def steady(self, s_k):
        return self.store.steady and self.store.graph is self.graph

    def prepare(self, s_k):
        self.graph.start.fill_(s_k)

    def account(self, s_k):
        self.store.lengths[0] = s_k

    def launch(self, x):
        return x + self.graph.start


_STORES: dict[int, Store] = {}  # as the real ops find their store: by an id, not held


def _stretch(store: Store) -> fx.GraphModule:
    """y = op(x) * w, the op adding the layer's new length (an append's position)."""
    key = id(store)
    _STORES[key] = store

    def op(x):
        store = _STORES[key]
        hook = step_capture.hook_to_launch("append", 0)
        if hook is not None:
            return hook.launch(x)
        store.lengths[0] += 1
        step_capture.observe(Hook(store, 0, store.graph) if store.steady else None)
        return x + store.lengths[0]

    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    graph.output((graph.call_function(torch.mul, (graph.call_function(op, (x,)), w)),))
    return fx.GraphModule(torch.nn.Module(), graph)


def rerun_capture(run):
    outputs = run()

    def replay():
        for out, new in zip(outputs, run()):
            out.copy_(new)

    return replay, outputs


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _step(replay: StepReplay, store: Store, w: torch.Tensor, step: int) -> None:
    x = torch.full((3,), float(step))  # a new tensor each step: staged
    (out,) = replay(x, w)
    assert torch.equal(out, (x + step) * w), step
    assert store.lengths == [step]


def test_steady_steps_are_captured_once_then_replayed_with_their_bookkeeping():
    store = Store()
    replay = StepReplay(_stretch(store), capture=rerun_capture)
    w = torch.tensor([1.0, 2.0, 3.0])  # the same tensor each step: read in place
    for step in range(1, 6):
        _step(replay, store, w, step)
    assert replay.stats == {"observed": 1, "captures": 1, "replays": 4}
    assert set(replay.buffers) == {0} and set(replay.addresses) == {1}


def test_a_segment_output_that_moved_at_its_capture_is_read_in_place():
    # Step 1's segment ran eagerly (w elsewhere); step 2's replays its graph into graph-owned
    # memory, where every later step writes it: the capture reads it there, copying nothing.
    store, in_place = Store(), set()
    replay = StepReplay(_stretch(store), capture=rerun_capture, in_place=in_place)
    _step(replay, store, torch.ones(3), 1)
    segment_output = torch.ones(3)
    in_place.add(segment_output.data_ptr())
    for step in range(2, 5):
        _step(replay, store, segment_output, step)
    assert replay.stats == {"observed": 1, "captures": 1, "replays": 3}
    assert set(replay.buffers) == {0} and set(replay.addresses) == {1}


def _replayed_three_steps():
    """A stretch observed at step 1, captured at step 2, replayed at step 3."""
    store, w = Store(), torch.ones(3)
    replay = StepReplay(_stretch(store), capture=rerun_capture)
    for step in range(1, 4):
        _step(replay, store, w, step)
    return replay, store, w


def test_a_step_that_is_not_steady_runs_as_observed_and_the_graph_is_kept():
    replay, store, w = _replayed_three_steps()
    store.steady = False  # e.g. a refresh is due
    _step(replay, store, w, 4)
    store.steady = True
    _step(replay, store, w, 5)  # observed: the last step reported no hook
    _step(replay, store, w, 6)
    assert replay.stats == {"observed": 3, "captures": 1, "replays": 3}


def test_a_new_layer_graph_or_a_moved_input_captures_again():
    replay, store, w = _replayed_three_steps()
    store.graph = Graph()  # the layer captured its own graph again: other buffers
    _step(replay, store, w, 4)  # the old hook is not steady: observed
    _step(replay, store, w, 5)
    _step(replay, store, w.clone(), 6)  # an input read in place moved
    assert replay.stats == {"observed": 2, "captures": 3, "replays": 4}


def test_a_failed_capture_leaves_the_stretch_observed_and_says_why(caplog):
    def failing_capture(run):
        raise RuntimeError("no graph here")

    store = Store()
    replay = StepReplay(_stretch(store), capture=failing_capture)
    w = torch.ones(3)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 5):
            _step(replay, store, w, step)
    assert replay.failure == "RuntimeError: no graph here"
    assert replay.stats == {"observed": 4, "captures": 0, "replays": 0}
    assert "capturing the whole step failed: RuntimeError: no graph here" in caplog.text


def test_a_dropped_store_is_not_kept_alive_by_the_hooks():
    store = Store()
    replay = StepReplay(_stretch(store), capture=rerun_capture)
    replay(torch.ones(3), torch.ones(3))
    assert replay.hooks and replay.hooks[0].store is store
    del _STORES[id(store)], store
    assert replay.hooks[0].store is None
    assert step_capture.step_lengths(replay.hooks) is None


def test_step_integers_are_filled_before_each_replay(monkeypatch):
    """A position made of the step's integer (``StepInt``) reads the integer of the step being
    replayed, not the one the capture saw."""
    from ihip_compile import step_int
    from ihip_compile.step_int import StepInt

    store = Store()
    plain = _stretch(store)
    graph = fx.Graph()
    x, w, s = (graph.placeholder(name) for name in ("x", "w", "s"))
    position = graph.call_module("step_int_0", (s,))
    (out,) = [n for n in plain.graph.nodes if n.op == "output"][0].args[0]
    env = {"x": x, "w": w}
    for node in plain.graph.nodes:
        if node.op == "call_function":
            env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.output((graph.call_function(torch.add, (env[out.name], position)),))
    root = torch.nn.Module()
    root.add_module("step_int_0", StepInt(torch.device("cpu")))
    capturing = []
    monkeypatch.setattr(step_int, "stream_capturing", lambda: bool(capturing))

    def capture(run):
        def as_captured():  # a CUDA graph reads the buffer as it is, never running the fill
            capturing.append(True)
            try:
                return run()
            finally:
                capturing.clear()

        return rerun_capture(as_captured)

    replay = StepReplay(fx.GraphModule(root, graph), capture=capture)
    assert [i for _, i in replay.step_ints] == [2]
    w = torch.ones(3)
    for step in range(1, 6):
        x = torch.full((3,), float(step))
        (got,) = replay(x, w, 100 + step)
        assert torch.equal(got, (x + step) * w + 100 + step), step
    assert replay.stats == {"observed": 1, "captures": 1, "replays": 4}
