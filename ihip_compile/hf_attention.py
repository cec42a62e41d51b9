"""Route a transformers model's attention through a function of ours, for one block of code.

transformers (5.x) looks attention up by name in ``AttentionInterface`` on every call, and hands
the function q and k after the model's RoPE, plus v, the mask and ``scaling``: the same tensors
our graph rewrite hands ``torch.ops.ihip.attention``. Calibration and the eval harness's
``interface`` path use this; nothing here is needed by the backend.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def routed_attention(model: Any, name: str, function: Callable) -> Iterator[None]:
    """Inside the block every attention of ``model`` calls ``function`` (registered as ``name``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
