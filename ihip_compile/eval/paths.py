"""How the eval runs a model: dense as it is, or with infinitehip attention.

Two routes to infinitehip, both ending in ``torch.ops.ihip.attention`` with the per-layer
arguments of ``ihip_compile.layer_policy``:
    "backend"    ``torch.compile(model.forward, backend=ihip_compile.backend(config))``: the real
                 product, graph passes included (``eager=True`` runs the rewritten graph without
                 Inductor, the ``infinitehip_eager`` backend);
    "interface"  transformers' attention interface calls the op directly, no graph capture: the
                 same numbers from the op, isolating it from the passes, and quick to start on CPU.
Both feed batch 1 without padding (no attention mask), the only inputs the harness makes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.hf_attention import routed_attention
from ihip_compile.layer_calibration import model_rope
from ihip_compile.layer_policy import sparse_args_for_layer

PATHS = ("backend", "interface")
_INTERFACE_NAME = "infinitehip_op"


class ModelRunner:
    """Forward functions of one model for the modes "dense" and "infinitehip"."""

    def __init__(self, model: Any, config: IHipConfig, path: str = "backend", eager: bool = False):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.model, self.config, self.path = model, config, path
        self._compiled = None
        if path == "backend":
            import ihip_compile

            self._compiled = torch.compile(
                model.forward, backend=ihip_compile.backend(config, eager=eager)
            )

    def forward(self, mode: str) -> Callable:
        if mode == "dense":
            return self.model.forward
        if mode != "infinitehip":
            raise ValueError(f"mode must be 'dense' or 'infinitehip', got {mode!r}")
        if self.path == "backend":
            return self._compiled
        return self._interface_forward

    def _interface_forward(self, *args, **kwargs):
        with _op_attention(self.model, self.config):
            return self.model.forward(*args, **kwargs)


@torch.no_grad()
def last_logits(forward: Callable, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """[1, keep, V] fp32 logits of the last ``keep`` positions.

    Run with a (fresh) cache: without one and without a mask, transformers 5.17 builds its
    causal mask through an ``eq`` the backend does not read, and every attention stays dense.
    """
    from transformers import DynamicCache

    out = forward(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True,
                  logits_to_keep=keep)
    return out.logits.float()


@torch.no_grad()
def greedy_answer(forward: Callable, input_ids: torch.Tensor, max_new_tokens: int,
                  cache: Any = None) -> list[int]:
    """Greedy continuation, one forward per new token; ``cache`` (a DynamicCache holding the
    keys before ``input_ids``) defaults to an empty one."""
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    past = cache.get_seq_length()
    out = forward(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                  cache_position=torch.arange(past, past + input_ids.shape[1],
                                              device=input_ids.device))
    new = []
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if step + 1 == max_new_tokens:
            break
        position = past + input_ids.shape[1] + step
        out = forward(
            input_ids=torch.tensor([[token]], device=input_ids.device), past_key_values=cache,
            use_cache=True, logits_to_keep=1,
            cache_position=torch.tensor([position], device=input_ids.device),
        )
    return new


@contextmanager
def _op_attention(model: Any, config: IHipConfig):
    """Route the model's attention through ``torch.ops.ihip.attention`` for one call."""
    import ihip_compile.kernels.ops  # noqa: F401  (registers torch.ops.ihip)

    inv_freq, rotary_dim, layout = model_rope(model)

    def attention(module, query, key, value, attention_mask, scaling=None, **_kwargs):
        if query.shape[0] != 1:
            raise ValueError(f"the interface path runs batch 1 without padding, got {query.shape}")
        s_q, s_k = query.shape[2], key.shape[2]
        out = torch.ops.ihip.attention(
            query, key, value, torch.arange(s_k - s_q, s_k, device=query.device), None, inv_freq,
            layer=module.layer_idx, scale=float(scaling), rotary_dim=rotary_dim, rope_layout=layout,
            **sparse_args_for_layer(config, module.layer_idx),
        )  # [1, H, S_Q, D]
        return out.transpose(1, 2).contiguous(), None

    with routed_attention(model, _INTERFACE_NAME, attention):
        yield


__all__ = ["ModelRunner", "PATHS", "greedy_answer", "last_logits"]
