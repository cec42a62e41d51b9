"""Decode steps with CUDA-graph segments on a GPU: the same tokens as without them."""

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

from ihip_compile import backend as ihip_backend
from ihip_compile.backend import keep_generation_masks_in_graph
from ihip_compile.config import IHipConfig
from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPTIONS = {"dense_below_tokens": 32, "sink_tokens": 8, "sliding_window_tokens": 16,
           "selected_tokens": 16, "stages": [[16, 64], [8, 32]], "refresh_intervals": [4, 2]}


def _model():
    return tiny_hf.build("llama").cuda()


def _cache(kind, model, tokens):
    if kind.startswith("offloaded"):
        config = IHipConfig(fp8_pruning_keys=kind == "offloaded_fp8_pruning_keys")
        return {"past_key_values": OffloadedCache(model.config, max_cache_tokens=tokens,
                                                  gpu_cache_tokens=32, ihip_config=config)}
    if kind == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    return {"past_key_values": DynamicCache(config=model.config)}


def _generate(model, graphs: bool, kind: str, new=20):
    torch._dynamo.reset()
    if kind == "static":
        keep_generation_masks_in_graph(model)
    model.forward = torch.compile(model.forward, backend=ihip_backend.backend(
        {**OPTIONS, "decode_cuda_graphs": graphs}))
    try:
        ids = torch.randint(3, tiny_hf.VOCAB, (1, 48), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(5))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **_cache(kind, model, 48 + new + 1))
    finally:
        del model.forward
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("kind", ["offloaded", "offloaded_fp8_pruning_keys", "dynamic", "static"])
def test_generate_with_decode_graphs_matches_without(kind):
    model = _model()
    tokens, logits = _generate(model, False, kind)
    ihip_backend.compiled_graphs.clear()
    got_tokens, got_logits = _generate(model, True, kind)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    states = [g.cuda_graphs for g in ihip_backend.compiled_graphs]
    assert any(s.startswith("on:") for s in states), states


def test_decode_graphs_replay_between_calls():
    model = _model()
    compiled = torch.compile(model, backend=ihip_backend.backend(OPTIONS))
    cache = OffloadedCache(model.config, max_cache_tokens=64, gpu_cache_tokens=32)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40), device="cuda")
    with torch.no_grad():
        token = compiled(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(8):
            token = compiled(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    decode = [g for g in ihip_backend.compiled_graphs if g.cuda_graphs.startswith("on:")][-1]
    segments = [m for name, m in decode.gm.named_children() if name.startswith("cuda_graph_")]
    assert segments and all(s.failure is None for s in segments)
    assert all(s.captures >= 1 and s.calls >= 5 for s in segments)


def _whole_step(compiled_graphs):
    decode = [g for g in compiled_graphs if g.cuda_graphs.startswith("on:")][-1]
    return decode, getattr(decode.gm, "decode_step_replay", None)


@pytest.mark.parametrize("steps", [40])
@pytest.mark.parametrize("fp8_pruning_keys", [False, True])
def test_whole_decode_steps_replay_as_one_graph_with_the_same_logits(steps, fp8_pruning_keys):
    # steady steps in a row between refreshes
    options = {**OPTIONS, "refresh_intervals": [16, 8], "fp8_pruning_keys": fp8_pruning_keys}
    model = _model()
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(7))
    logits = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        ihip_backend.compiled_graphs.clear()
        compiled = torch.compile(model, backend=ihip_backend.backend(
            {**options, "decode_cuda_graphs": graphs}))
        cache = OffloadedCache(model.config, max_cache_tokens=40 + steps + 1,
                               gpu_cache_tokens=128, ihip_config=IHipConfig(**options))
        got, refreshed, replayed = [], [], []
        with torch.no_grad():
            token = compiled(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                runs, replays = _stage_runs(cache), _replays(ihip_backend.compiled_graphs)
                out = compiled(input_ids=token, past_key_values=cache).logits
                refreshed.append(_stage_runs(cache) != runs)
                replayed.append(_replays(ihip_backend.compiled_graphs) > replays)
                got.append(out)
                token = out[:, -1:].argmax(-1)
        logits[graphs] = torch.cat(got, dim=1)
        assert cache.get_seq_length() == 40 + steps
        store = weakref.ref(cache.store)
        del cache, out
        gc.collect()
        assert store() is None, "a dropped cache's host memory is freed"
    decode, step = _whole_step(ihip_backend.compiled_graphs)
    assert step is not None, decode.cuda_graphs
    assert step.failure is None and step.stats["captures"] >= 1
    assert step.stats["replays"] >= steps // 3, step.stats
    # A refresh runs observed; the step after it replays (the refresh reported the hooks that
    # set it up). Every 8th step refreshes, as its window enters a new block.
    after_refresh = [i for i in range(4, steps) if refreshed[i - 1] and not refreshed[i]]
    assert len(after_refresh) >= steps // 8 - 1, refreshed
    assert all(replayed[i] for i in after_refresh), (refreshed, replayed)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def _stage_runs(cache) -> int:
    return sum(sum(runs) for runs in cache.store.selection_states.stage_runs.values())


def _replays(compiled_graphs) -> int:
    steps = [getattr(g.gm, "decode_step_replay", None) for g in compiled_graphs]
    return sum(step.stats["replays"] for step in steps if step is not None)


def test_whole_decode_steps_replay_through_generate_with_a_padding_mask():
    options = {**OPTIONS, "refresh_intervals": [16, 8]}
    model = _model()
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        ihip_backend.compiled_graphs.clear()
        model.forward = torch.compile(model.forward, backend=ihip_backend.backend(
            {**options, "decode_cuda_graphs": graphs}))
        try:
            ids = torch.randint(3, tiny_hf.VOCAB, (1, 48), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(11))
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, past_key_values=OffloadedCache(
                                     model.config, max_cache_tokens=89, gpu_cache_tokens=128))
        finally:
            del model.forward
        runs[graphs] = out.sequences, torch.stack(out.logits)
    _, step = _whole_step(ihip_backend.compiled_graphs)
    assert step is not None and step.mask_inputs and step.failure is None
    assert step.stats["replays"] >= 10, step.stats
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)
