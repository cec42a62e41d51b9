"""The ``ihip::`` custom ops: the one place where graphs meet kernels.

``torch.ops.ihip.attention`` is what the graph passes emit for every rewritten attention site.
Inductor treats it as opaque (it has a fake implementation for tracing). It dispatches:
    S_K < dense_below_tokens, or no sparse path for the inputs  -> exact dense attention
    otherwise                                                    -> InfiniteHiP sparse attention
Arguments are plain tensors and scalars: the kernels never see the config object.
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.dense_attention_ref import dense_attention

_ATTENTION_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor q_positions, Tensor? kv_valid, Tensor? inv_freq, *, "
    "int layer, float scale, float softcap=0., int model_window=0, "
    "int rotary_dim=0, int rope_layout=0, "
    "int dense_below_tokens=8192, int block_size_q=64, int sink_tokens=256, "
    "int window_tokens=1024, int selected_tokens=2048, "
    "int[] stage_chunks=[256, 32, 8], int[] stage_keeps=[32768, 8192, 2048], "
    "int pruning_rope=0, int remap_beyond_tokens=-1) -> Tensor"
)

# rope_layout values: how the model rotated q and k before attention (0: no RoPE found).
ROPE_NONE, ROPE_ROTATE_HALF, ROPE_INTERLEAVED = 0, 1, 2
# pruning_rope values (positions given to keys while scoring chunks) and remap_beyond_tokens
# (-1: never remap) are chosen per layer by ihip_compile.layer_policy.

_lib = torch.library.Library("ihip", "DEF")
_lib.define("attention" + _ATTENTION_SCHEMA)


def _attention(
    q, k, v, q_positions, kv_valid, inv_freq, *, layer, scale, softcap=0.0, model_window=0,
    rotary_dim=0, rope_layout=0, dense_below_tokens=8192, block_size_q=64, sink_tokens=256,
    window_tokens=1024, selected_tokens=2048, stage_chunks=(256, 32, 8),
    stage_keeps=(32768, 8192, 2048), pruning_rope=0, remap_beyond_tokens=-1,
):
    return dense_attention(
        q, k, v, q_positions, kv_valid, scale=scale, softcap=softcap, model_window=model_window
    )


torch.library.impl("ihip::attention", "CompositeExplicitAutograd", lib=_lib)(_attention)


@torch.library.register_fake("ihip::attention", lib=_lib)
def _attention_fake(q, k, v, q_positions, kv_valid, inv_freq, **_scalars):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
