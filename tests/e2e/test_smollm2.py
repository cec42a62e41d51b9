"""SmolLM2-135M-Instruct, a real model, through the backend: same tokens as eager.

On a CPU the rewritten graph runs without Inductor (``infinitehip_eager``: Inductor's C++ build of
a 30-layer model takes minutes on two cores); on a GPU the full ``infinitehip`` backend runs.
Every attention layer must be rewritten, forward logits must match eager and ``generate()`` must
produce the same greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from backend_checks import compiled_results, max_abs_error, op_nodes

from ihip_compile import smollm2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "infinitehip" if DEVICE == "cuda" else "infinitehip_eager"
PROMPT = "The capital of France is a city whose name is"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return smollm2.load_smollm2(dtype=torch.float32, device=DEVICE)


def _greedy(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_forward_and_generate_match_eager(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE)
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens, ref_step_logits = _greedy(model, ids)
        compiled = torch.compile(model, backend=BACKEND)
        logits = compiled(ids).logits
        assert all(len(op_nodes(r.gm)) == model.config.num_hidden_layers
                   for r in compiled_results())
        model.compile(backend=BACKEND)
        tokens, step_logits = _greedy(model, ids)
    scale = ref_logits.abs().max().item()
    # Dense attention below the threshold: only the reduction order differs from eager.
    assert max_abs_error(ref_logits, logits) <= 1e-4 * scale
    assert max_abs_error(ref_step_logits, step_logits) <= 1e-4 * scale
    assert torch.equal(ref_tokens, tokens), (
        tokenizer.decode(ref_tokens[0]), tokenizer.decode(tokens[0]))
