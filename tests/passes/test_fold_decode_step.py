"""The offloaded decode step folded into one module (``passes/fold_decode_step``).

On the CPU the offloaded ops take no steady path (their graphs are CUDA's), so the folded module
runs every step as observed: these tests check the fold itself, that the folded graph gives the
same tokens through ``generate()`` (its cache keeps the zero-stride proxies the graph returns,
remade at every step), and what the pass refuses. Capture and replay are tested on a GPU in
tests/e2e/test_decode_cuda_graphs.py.
"""

import operator

import pytest
import torch
import torch.fx as fx

from ihip_compile import backend as ihip_backend
from ihip_compile.config import IHipConfig
from ihip_compile.cuda_graph_segment import GraphedSegment
from ihip_compile.decode_step_replay import StepReplay
from ihip_compile.offload import OffloadedCache
from ihip_compile.passes.fold_decode_step import STEP_MODULE, fold_decode_step
from ihip_compile.passes.segment_decode_graph import decode_graph_problem, segment_decode_graph
from ihip_compile.step_int import StepInt
from tests.models import tiny_hf
from tests.passes.test_segment_decode_graph import OPTIONS, RerunCapture


def _folding_backend(folds: list):
    config = IHipConfig.from_options(OPTIONS)
    capture = RerunCapture()

    def compile_graph(gm, example_inputs):
        gm = ihip_backend.rewrite(gm, config).gm
        if decode_graph_problem(gm, "cpu") is None:
            in_place = set()
            segment_decode_graph(gm, "cpu", lambda m: GraphedSegment(m, capture, in_place))
            folds.append((fold_decode_step(gm, StepReplay), gm))
        return gm.forward

    return compile_graph


def _generate(model, backend, new=12):
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        ids = torch.randint(3, tiny_hf.VOCAB, (1, 48), generator=torch.Generator().manual_seed(2))
        cache = OffloadedCache(model.config, max_cache_tokens=48 + new + 1, gpu_cache_tokens=32)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             past_key_values=cache)
    finally:
        del model.forward
    return out.sequences, torch.stack(out.logits)


def test_folded_decode_gives_the_same_tokens_through_generate():
    model = tiny_hf.build("llama")
    want_tokens, want_logits = _generate(model, ihip_backend.backend(OPTIONS, eager=True))
    folds = []
    tokens, logits = _generate(model, _folding_backend(folds))
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    status, gm = folds[-1]
    assert status.startswith("on: one graph for 2 attention layers"), status
    assert "from the first segment; step integers read on the device: 1" in status, status
    outside = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != STEP_MODULE]
    assert not outside, "the segments before the first offloaded op run inside the step too"
    step = getattr(gm, STEP_MODULE)
    assert step.stats["observed"] >= 10 and step.stats["replays"] == 0
    assert step.mask_inputs, "the padding mask is an input the captured step does not read"
    assert len(step.step_ints) == 1, "the query positions read the cache length on the device"
    ops = [n for n in gm.graph.nodes if str(n.target).startswith("ihip.")]
    assert not ops, "every offloaded op runs inside the folded module"


def _graph_with(after_attention, before_append=None) -> fx.GraphModule:
    """append -> marker -> attention -> ``after_attention(graph, attention_node)``;
    ``before_append(graph, gm, q)`` may replace the query first."""
    graph = fx.Graph()
    q, k, store = (graph.placeholder(name) for name in ("q", "k", "store_id"))
    root = torch.nn.Module()
    if before_append is not None:
        q = before_append(graph, root, q)
    marker = graph.call_function(torch.ops.ihip.kv_store_append, (k, k, store, 0))
    proxy = graph.call_method("expand", (graph.call_method("view", (marker, 1, 1, 1, 1)),
                                         1, 2, 8, 4))
    attention = graph.call_function(torch.ops.ihip.attention.default,
                                    (q, proxy, proxy, q, None, None), {"layer": 0, "scale": 1.0})
    graph.output(after_attention(graph, attention))
    return fx.GraphModule(root, graph)


def test_device_work_reading_the_step_outside_a_segment_is_refused():
    gm = _graph_with(lambda graph, attention: graph.call_function(torch.relu, (attention,)))
    status = fold_decode_step(gm, StepReplay)
    assert status.startswith("not used: device work outside a segment"), status
    assert not hasattr(gm, STEP_MODULE)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul])
def test_a_step_integer_on_the_device_gives_the_values_and_dtype_of_the_integer(op, dtype):
    index = torch.arange(3, dtype=dtype)
    s = 1 << 20
    want = op(index, s), op(s, index)
    got = op(index, StepInt(torch.device("cpu"))(s)), op(StepInt(torch.device("cpu"))(s), index)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_a_segment_whose_output_eager_work_reads_keeps_its_graph():
    """Eager work between a segment and the first op that reads the segment's output cannot
    move before the step: the fold starts at the first op, the segment replays on its own."""

    def segment_then_eager(graph, root, q):
        root.add_module("cuda_graph_segment_0", torch.nn.Identity())
        out = graph.call_module("cuda_graph_segment_0", (q,))
        return graph.call_function(torch.add, (out, 1))

    gm = _graph_with(lambda graph, attention: attention, segment_then_eager)
    status = fold_decode_step(gm, StepReplay)
    assert "from the first offloaded op;" in status, status
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["cuda_graph_segment_0", STEP_MODULE]


def test_attention_without_an_offloaded_cache_is_not_folded():
    graph = fx.Graph()
    q = graph.placeholder("q")
    graph.output(graph.call_function(torch.ops.ihip.attention.default,
                                     (q, q, q, q, None, None), {"layer": 0, "scale": 1.0}))
    status = fold_decode_step(fx.GraphModule(torch.nn.Module(), graph), StepReplay)
    assert status == "not used: the attention does not read an offloaded cache"
