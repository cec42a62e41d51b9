"""The unmodified model compiled with the infinitehip backend, generating with OffloadedCache."""

import pytest
import torch

from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf

# Sparse from 16 keys on, selection wide enough to cover every key of these prompts, so sparse
# attention equals dense and the generated tokens must match the uncompiled model's.
OPTIONS = {"dense_below_tokens": 16, "sink_tokens": 4, "sliding_window_tokens": 8,
           "selected_tokens": 48, "stages": [[16, 64], [8, 48]], "refresh_intervals": [3, 1]}


def test_compiled_generate_with_offloaded_cache_takes_the_sparse_path():
    torch._dynamo.reset()
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options=OPTIONS)
    cache = OffloadedCache(model.config, max_cache_tokens=48, gpu_cache_tokens=32)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    counts = cache.hit_counts()
    assert all(row["attention_hits"] + row["attention_misses"] > 0 for row in counts)
    steps = cache.store.selection_states.steps
    assert steps == {0: 5, 1: 5}  # every decode step of both layers went the sparse way


@pytest.mark.parametrize("family", [f for f in tiny_hf.FAMILIES if f != "llama"])
def test_every_family_generates_as_eager_through_the_offloaded_sparse_path(family):
    """Layers with a sliding window of their own stay dense (their steps are not counted); the
    others decode the sparse way, and the tokens equal the uncompiled model's."""
    torch._dynamo.reset()
    model = tiny_hf.build(family)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options=OPTIONS)
    cache = OffloadedCache(model.config, max_cache_tokens=48, gpu_cache_tokens=32)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    windowed = {i for i, t in enumerate(getattr(model.config, "layer_types", None) or [])
                if t == "sliding_attention"}
    if getattr(model.config, "sliding_window", None) and not windowed:
        windowed = set(range(model.config.num_hidden_layers))
    sparse = set(range(model.config.num_hidden_layers)) - windowed
    assert cache.store.selection_states.steps == dict.fromkeys(sparse, 5)
