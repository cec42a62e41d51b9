"""The eval's two routes to infinitehip give the same numbers on a tiny Llama.

``backend`` (graph passes + op) and ``interface`` (op called from transformers' attention
interface) must hand the op the same tensors and per-layer arguments; the sparse path is reached
(keys >= dense_below_tokens) and RoPE is remapped (``rope_remap="always"``).
"""

from __future__ import annotations

import dataclasses

import torch

from ihip_compile.eval.paths import ModelRunner, greedy_answer, last_logits

from test_calibration import TINY, tiny_llama

CONFIG = dataclasses.replace(TINY, rope_remap="always")


def test_backend_and_interface_paths_agree():
    model = tiny_llama(2)
    ids = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    interface = ModelRunner(model, CONFIG, path="interface")
    backend = ModelRunner(model, CONFIG, path="backend")  # Inductor, as the GPU runs
    ours = last_logits(interface.forward("infinitehip"), ids, 40)
    dense = last_logits(interface.forward("dense"), ids, 40)
    torch.testing.assert_close(last_logits(backend.forward("infinitehip"), ids, 40), ours)
    assert (ours - dense).abs().max() > 1e-4  # the sparse path really ran
    assert greedy_answer(backend.forward("infinitehip"), ids, 3) == greedy_answer(
        interface.forward("infinitehip"), ids, 3)
