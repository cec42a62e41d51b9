"""A transformers attention function that calls ``torch.ops.ihip.attention`` as the graph passes
emit it, so the offloaded cache is tested on real models without depending on the passes."""

import torch
import transformers

import ihip_compile.kernels.ops  # noqa: F401  (registers ihip::attention)

NAME = "ihip_op_for_tests"
SCALARS: dict = {}  # extra keyword scalars for the op (tests set sparse settings here)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    s_q, s_k = query.shape[2], key.shape[2]
    positions = torch.arange(s_k - s_q, s_k, device=query.device)
    out = torch.ops.ihip.attention(
        query, key, value, positions, None, None, layer=module.layer_idx,
        scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5), **SCALARS,
    )
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(NAME, _attention)
