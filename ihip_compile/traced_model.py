"""The model that ``torch.compile`` is tracing, found from inside the backend call.

The graph a backend receives carries no model config, yet ``rope_remap="auto"`` needs the
model's trained context length: within it the model sees its true positions, beyond it the op
renumbers them. Dynamo calls the backend while it translates the compiled frame, and that
frame's locals hold the module being run (``self`` of ``forward``), whose ``config`` says the
length (``layer_policy.infer_trained_context_tokens``). Reading them goes through Dynamo's
current instruction translator, which is not a public interface: where it is missing or holds no
such module, the length stays unknown and the backend's report says so.
"""

from __future__ import annotations

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.layer_policy import infer_trained_context_tokens, with_model_facts


def traced_model() -> torch.nn.Module | None:
    """The module with a model config among the locals of the frame Dynamo is translating, or
    None (not inside a Dynamo translation, or no such module there)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None
    for value in (getattr(translator, "f_locals", None) or {}).values():
        if isinstance(value, torch.nn.Module) and infer_trained_context_tokens(value):
            return value
    return None


def with_trained_context(config: IHipConfig) -> tuple[IHipConfig, str]:
    """``config`` with ``trained_context_tokens`` taken from the traced model when not given,
    and a line saying where the length came from (for the graph report)."""
    if config.trained_context_tokens is not None:
        return config, f"{config.trained_context_tokens} tokens (given)"
    model = traced_model()
    if model is None:
        return config, ("unknown: no model config found while tracing; pass "
                        "trained_context_tokens, else rope_remap='auto' remaps RoPE positions at "
                        "every sparse call")
    filled = with_model_facts(config, model)
    return filled, f"{filled.trained_context_tokens} tokens (from {type(model).__name__}.config)"
