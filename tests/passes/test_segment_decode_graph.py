"""Decode graphs folded into CUDA-graph segments: same tokens, nothing per-step inside a segment.

On the CPU the segments are made for device "cpu" and "captured" by ``RerunCapture``, which
replays by running the segment again on the inputs it was captured with and writing into the
outputs it returned, as a CUDA graph does; the real capture is tested on a GPU in
tests/e2e/test_decode_cuda_graphs.py.
"""

import logging

import pytest
import torch

from ihip_compile import backend as ihip_backend, capture as ihip_capture, cuda_graph_segment
from ihip_compile.backend import keep_generation_masks_in_graph
from ihip_compile.config import IHipConfig
from ihip_compile.cuda_graph_segment import GraphedSegment
from ihip_compile.offload import OffloadedCache
from ihip_compile.passes.segment_decode_graph import (
    FEEDS_EAGER, SEGMENT_PREFIX, decode_graph_problem, eager_reason, is_ihip, segment_decode_graph,
)
from tests.models import tiny_hf

OPTIONS = {"dense_below_tokens": 32, "sink_tokens": 8, "sliding_window_tokens": 16,
           "selected_tokens": 16, "stages": [[16, 64], [8, 32]], "refresh_intervals": [4, 2]}


class RerunCapture:
    """Stand-in for ``CudaGraphCapture`` on the CPU (see the module docstring)."""

    def __init__(self):
        self.captures = 0

    def capture(self, run, device):
        self.captures += 1
        outputs = run()

        def replay():
            for out, new in zip(outputs, run()):
                out.copy_(new)

        return replay, outputs


def _segmenting_backend(capture, plans, compiler=None):
    config = IHipConfig.from_options(OPTIONS)

    def compile_graph(gm, example_inputs):
        gm = ihip_backend.rewrite(gm, config).gm
        if decode_graph_problem(gm, "cpu") is None:
            in_place = set()
            plans.append(segment_decode_graph(
                gm, "cpu", lambda m: GraphedSegment(m, capture, in_place, compiler)))
        return gm.forward

    return compile_graph


def _decode(model, compiled, steps=14, prompt=40):
    ids = torch.randint(3, tiny_hf.VOCAB, (1, prompt), generator=torch.Generator().manual_seed(3))
    cache = OffloadedCache(model.config, max_cache_tokens=prompt + steps + 1, gpu_cache_tokens=32)
    logits = []
    with torch.no_grad():
        out = compiled(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = compiled(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, dim=1)


def test_segmented_decode_gives_the_same_logits_and_replays():
    model = tiny_hf.build("llama")
    want = _decode(model, torch.compile(model, backend=ihip_backend.backend(OPTIONS, eager=True)))
    torch._dynamo.reset()
    capture, plans = RerunCapture(), []
    got = _decode(model, torch.compile(model, backend=_segmenting_backend(capture, plans)))
    assert torch.equal(got, want)
    assert plans and all(plan.segments for plan in plans)
    assert capture.captures >= len(plans[-1].segments)
    assert plans[-1].eager["ihip op"] == 2 * model.config.num_hidden_layers


def test_inductor_compiled_segments_decode_the_same_tokens():
    model = tiny_hf.build("llama")
    want = _decode(model, torch.compile(model, backend=ihip_backend.backend(OPTIONS, eager=True)))
    torch._dynamo.reset()
    compiled = []

    def inductor(segment, example_inputs):
        compiled.append(segment)
        return ihip_capture.compile_segment(segment, example_inputs)

    capture, plans = RerunCapture(), []
    got = _decode(model, torch.compile(model, backend=_segmenting_backend(capture, plans,
                                                                          inductor)))
    assert len(compiled) == sum(len(plan.segments) for plan in plans)
    assert capture.captures >= len(plans[-1].segments)
    # Fused kernels sum in another order: float32 rounding of the logits' scale, no more.
    atol = 64 * torch.finfo(want.dtype).eps * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_segments_hold_no_ihip_op_and_no_symbolic_value():
    model = tiny_hf.build("llama")
    graphs = []

    def keep(gm, example_inputs):
        gm = ihip_backend.rewrite(gm, IHipConfig.from_options(OPTIONS)).gm
        if decode_graph_problem(gm, "cpu") is None:
            segment_decode_graph(gm, "cpu")
            graphs.append(gm)
        return gm.forward

    _decode(model, torch.compile(model, backend=keep), steps=3)
    assert graphs
    segments = [m for name, m in graphs[-1].named_children() if name.startswith(SEGMENT_PREFIX)]
    assert segments
    for segment in segments:
        for node in segment.graph.nodes:
            if node.op in ("call_function", "call_method"):
                assert eager_reason(node, "cpu") is None, node.format_node()


def test_positions_made_from_the_cache_length_leave_one_segment_before_the_first_op():
    """The ``arange(1)`` a position adds the cache length to runs eagerly, before the segment:
    inside it, the segment would end there and a second one would follow the addition."""
    model = tiny_hf.build("llama")
    graphs, plans = [], []

    def keep(gm, example_inputs):
        gm = ihip_backend.rewrite(gm, IHipConfig.from_options(OPTIONS)).gm
        if decode_graph_problem(gm, "cpu") is None:
            plans.append(segment_decode_graph(gm, "cpu"))
            graphs.append(gm)
        return gm.forward

    _decode(model, torch.compile(model, backend=keep), steps=3)
    assert plans[-1].eager[FEEDS_EAGER] >= 1
    before_op = []
    for node in graphs[-1].graph.nodes:
        if is_ihip(node):
            break
        if node.op == "call_module":
            before_op.append(node.target)
    assert before_op == [f"{SEGMENT_PREFIX}0"]


def test_prefill_graphs_are_not_segmented():
    model = tiny_hf.build("llama")
    problems = []

    def keep(gm, example_inputs):
        gm = ihip_backend.rewrite(gm, IHipConfig.from_options(OPTIONS)).gm
        problems.append(decode_graph_problem(gm, "cpu"))
        return gm.forward

    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40))
    cache = OffloadedCache(model.config, max_cache_tokens=48)
    with torch.no_grad():
        torch.compile(model, backend=keep)(input_ids=ids, past_key_values=cache, use_cache=True)
    assert problems == ["not a decode step (query length is not one)"]


class _Double(torch.nn.Module):
    def forward(self, x, w):
        return (x * w + 1,)


def _graphed():
    capture = RerunCapture()
    return GraphedSegment(_Double(), capture, set()), capture


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


def test_a_new_input_each_call_is_staged_and_parameters_are_read_in_place():
    segment, capture = _graphed()
    w = torch.nn.Parameter(torch.full((3,), 2.0), requires_grad=False)
    for step in range(5):
        x = torch.full((3,), float(step))
        (out,) = segment(x, w)
        assert torch.equal(out, x * 2 + 1)
    assert capture.captures == 1 and segment.staged == {0}


def test_an_input_read_in_place_that_moves_is_staged_and_captured_again():
    segment, capture = _graphed()
    x = torch.ones(3)
    w = torch.full((3,), 2.0)  # a buffer: the same tensor at calls 1 and 2
    segment(x, w)
    segment(x.clone(), w)
    moved = torch.full((3,), 5.0)
    (out,) = segment(torch.ones(3), moved)
    assert torch.equal(out, torch.full((3,), 6.0))
    assert capture.captures == 2 and segment.staged == {0, 1}


def test_replayed_outputs_change_version():
    segment, _ = _graphed()
    w = torch.full((3,), 2.0)
    segment(torch.ones(3), w)
    (first,) = segment(torch.ones(3), w)
    version = first._version
    (again,) = segment(torch.zeros(3), w)
    assert again is first and again._version > version


def test_a_failed_capture_leaves_the_segment_eager_and_says_why(caplog):
    class Failing:
        def capture(self, run, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    segment = GraphedSegment(_Double(), Failing(), set())
    w = torch.full((3,), 2.0)
    segment(torch.ones(3), w)
    with caplog.at_level(logging.WARNING):
        (out,) = segment(torch.ones(3), w)
    assert torch.equal(out, torch.full((3,), 3.0))
    assert "not permitted" in segment.failure and "stays eager" in caplog.text
    (out,) = segment(torch.zeros(3), w)
    assert torch.equal(out, torch.ones(3))


def test_a_compiled_segment_is_what_runs_and_is_captured():
    compiles, runs = [], []

    def compiler(segment, example_inputs):
        compiles.append(example_inputs)

        def compiled(x, w):
            runs.append(x.clone())
            return segment(x, w)

        return compiled

    capture = RerunCapture()
    segment = GraphedSegment(_Double(), capture, set(), compiler)
    w = torch.full((3,), 2.0)
    for step in range(4):
        (out,) = segment(torch.full((3,), float(step)), w)
        assert torch.equal(out, torch.full((3,), 2.0 * step + 1))
    assert len(compiles) == 1 and compiles[0][1] is w
    # Call 1 ran it, call 2 captured it and replayed it, calls 3 and 4 replayed it (the
    # stand-in capture reruns it at each).
    assert capture.captures == 1 and [r[0].item() for r in runs] == [0.0, 1.0, 1.0, 2.0, 3.0]


def test_a_failed_compilation_runs_the_traced_ops_and_says_why(caplog):
    def compiler(segment, example_inputs):
        raise RuntimeError("no C++ compiler found")

    capture = RerunCapture()
    segment = GraphedSegment(_Double(), capture, set(), compiler)
    w = torch.full((3,), 2.0)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            (out,) = segment(torch.full((3,), float(step)), w)
            assert torch.equal(out, torch.full((3,), 2.0 * step + 1))
    assert "no C++ compiler" in segment.compile_failure and "unfused" in caplog.text
    assert capture.captures == 1


def test_with_gradients_on_a_segment_runs_eagerly_and_keeps_history(caplog, monkeypatch):
    monkeypatch.setattr(cuda_graph_segment, "_warned_about_gradients", False)
    capture = RerunCapture()
    segment = GraphedSegment(_Double(), capture, set(), lambda *_: pytest.fail("compiled"))
    w = torch.full((3,), 2.0, requires_grad=True)
    with torch.enable_grad(), caplog.at_level(logging.WARNING):
        for _ in range(3):
            (out,) = segment(torch.ones(3), w)
            out.sum().backward()
    assert capture.captures == 0 and torch.equal(w.grad, torch.full((3,), 3.0))
    assert caplog.text.count("not replayed while gradients are enabled") == 1


def test_collectives_stay_eager():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.ones(4)
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    reduced.meta["example_value"] = torch.ones(4)
    assert eager_reason(reduced, "cpu") == "collective"


@pytest.mark.parametrize("name", ["decode_cuda_graphs", "decode_step_graph"])
@pytest.mark.parametrize("value", [1, "yes"])
def test_decode_graph_options_must_be_bools(name, value):
    with pytest.raises(ValueError, match=f"{name} must be true or false"):
        IHipConfig(**{name: value})


class _Annotate(torch.fx.Interpreter):
    """Record each node's value as its example value, as Dynamo does."""

    def run_node(self, node):
        value = super().run_node(node)
        node.meta["example_value"] = value
        return value


def _reads_around_a_write(x):
    before = ((x * 2) + 1) * 2 - 1
    x.add_(1)  # an in-place write (a static cache's update) between two reads
    after = ((x * 3) + 1) * 3 - 1
    return before, after


def test_reads_keep_their_side_of_an_in_place_write():
    gm = torch.fx.symbolic_trace(_reads_around_a_write)
    _Annotate(gm).run(torch.ones(4))
    plan = segment_decode_graph(gm, "cpu")
    assert len(plan.segments) == 2 and plan.eager["in-place or impure"] == 1
    got = gm(torch.ones(4))
    want = _reads_around_a_write(torch.ones(4))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _generate_static(backend):
    model = tiny_hf.build("llama")
    keep_generation_masks_in_graph(model)
    model.compile(backend=backend)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_static_cache_decode_segments_keep_the_cache_writes_in_place():
    """A static cache's update is in-place (its length counter, then the K/V slots): the
    segments must read the counter before it moves, and the cache after it is written."""
    want_tokens, want_logits = _generate_static(ihip_backend.backend(OPTIONS, eager=True))
    torch._dynamo.reset()
    capture, plans = RerunCapture(), []
    tokens, logits = _generate_static(_segmenting_backend(capture, plans))
    assert plans and plans[-1].eager["in-place or impure"] > 0 and capture.captures > 0
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)


def _generate_family(family, backend):
    model = tiny_hf.build(family)
    model.compile(backend=backend)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40), generator=torch.Generator().manual_seed(8))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_every_family_decodes_the_same_with_segments(family):
    """Each family's decode graph (windows, soft-caps, partial rotary, tied norms...) segments
    and replays to the same tokens and logits."""
    want_tokens, want_logits = _generate_family(family, ihip_backend.backend(OPTIONS, eager=True))
    torch._dynamo.reset()
    capture, plans = RerunCapture(), []
    tokens, logits = _generate_family(family, _segmenting_backend(capture, plans))
    assert plans and plans[-1].segments and capture.captures > 0
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
