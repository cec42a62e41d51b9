"""Decode steps over an offloaded cache make no device-to-host sync on a GPU, refresh or not.

A sync stops the host from queueing the next layers' work while the GPU drains, and host-bound
decode pays for every one (reports/bench/sync_free_banks/). CUDA's sync debug mode raises at any.
"""

import pytest
import torch

from ihip_compile import backend as ihip_backend
from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPTIONS = {"dense_below_tokens": 32, "sink_tokens": 8, "sliding_window_tokens": 16,
           "selected_tokens": 16, "stages": [[16, 64], [8, 32]], "refresh_intervals": [4, 2]}


def _stage_runs(cache) -> int:
    return sum(sum(runs) for runs in cache.store.selection_states.stage_runs.values())


# 32 tokens: banks that keep evicting; 256: banks that hold every block a step attends, so the
# steps between refreshes are served from the slots they recorded.
@pytest.mark.parametrize("gpu_cache_tokens", [32, 256])
def test_offloaded_decode_steps_make_no_host_sync(gpu_cache_tokens):
    torch._dynamo.reset()
    model = tiny_hf.build("llama").cuda()
    compiled = torch.compile(model, backend=ihip_backend.backend(OPTIONS, eager=True))
    cache = OffloadedCache(model.config, max_cache_tokens=64, gpu_cache_tokens=gpu_cache_tokens)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 40), device="cuda")

    def step(token):
        return compiled(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)

    with torch.no_grad():
        token = step(ids)
        for _ in range(6):  # compilation and the segments' capture may sync
            token = step(token)
        runs = _stage_runs(cache)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(8):
                token = step(token)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _stage_runs(cache) > runs  # refresh steps were among those checked
    assert cache.store.selection_states.steps[0] == 14
