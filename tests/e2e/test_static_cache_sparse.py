"""A static cache's unused slots are cut off, so long static-cache prompts take the sparse path:
the same tokens as over a DynamicCache of the same prompt, with the selection cached across
decode steps (the key count grows by one per step, as with a DynamicCache)."""

import torch

from ihip_compile import backend as ihip_backend
from ihip_compile.backend import keep_generation_masks_in_graph
from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES
from models import tiny_hf

OPTIONS = {"dense_below_tokens": 32, "sink_tokens": 8, "sliding_window_tokens": 16,
           "selected_tokens": 16, "stages": [[16, 64], [8, 32]], "refresh_intervals": [4, 2]}


def _generate(cache_implementation=None):
    model = tiny_hf.build("llama")
    if cache_implementation == "static":
        keep_generation_masks_in_graph(model)
    model.compile(backend=ihip_backend.backend(OPTIONS, eager=True))
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 48), generator=torch.Generator().manual_seed(4))
    kwargs = {"cache_implementation": cache_implementation} if cache_implementation else {}
    DENSE_PATH_STATES.forget()
    DENSE_PATH_STATES.stage_runs.clear()
    DENSE_PATH_STATES.steps.clear()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, return_dict_in_generate=True, output_logits=True,
                             **kwargs)
    served = dict(DENSE_PATH_STATES.steps)
    return out.sequences, torch.stack(out.logits, dim=1), served


def test_static_cache_decodes_sparse_like_a_dynamic_cache():
    tokens, logits, served = _generate()
    static_tokens, static_logits, static_served = _generate("static")
    assert torch.equal(static_tokens, tokens)
    torch.testing.assert_close(static_logits, logits, rtol=1e-5, atol=1e-5)
    layers = tiny_hf.build("llama").config.num_hidden_layers
    assert served == static_served == {layer: 11 for layer in range(layers)}
