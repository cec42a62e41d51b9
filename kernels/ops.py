"""The ``ihip::`` custom ops: the one place where graphs meet kernels.

``torch.ops.ihip.attention`` is what the graph passes emit for every rewritten attention site.
Inductor treats it as opaque (it has a fake implementation for tracing). It dispatches:
    S_K < dense_below_tokens, or no sparse path for the inputs  -> exact dense attention
    otherwise                                                    -> InfiniteHiP sparse attention
Arguments are plain tensors and scalars: the kernels never see the config object.

The sparse path (``sparse_attention.sparse_attention``; Triton on CUDA, the torch references on
CPU) does not model padding or a model's own sliding window: calls whose ``kv_valid`` hides a key
(other than the unused slots at the end of a static cache, which are cut off: the call then
attends a cache of that many keys) or with ``model_window > 0`` take the exact dense path, as
do value head dims other than q's and dtypes the kernels lack (fp64 on CUDA); such a call at a
long context is logged, once per reason (a model's own window is dense by design). RoPE is remapped
(StreamingLLM renumbering in the attention, ``pruning_rope`` positions in the pruning) when
``remap_beyond_tokens >= 0`` and S_K > remap_beyond_tokens, and only when ``rope_layout`` and
``inv_freq`` describe the model's RoPE.
"""

from __future__ import annotations

import logging

import torch

from ihip_compile.kernels.dense_attention_ref import dense_attention
from ihip_compile.kernels.sparse_attention import (
    GPU_DTYPES, REFERENCE_DTYPES, sparse_attention, sparse_kwargs,
)
from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES, cached_sparse_decode
from ihip_compile.kernels.kv_store import is_offload_proxy
from ihip_compile.kernels.offloaded_attention import offloaded_attention
from ihip_compile.kernels.padding_check import hides_nothing, valid_prefix
from ihip_compile.kernels.prune_stage_ref import DEFAULT_FIRST_PROBES

log = logging.getLogger(__name__)

_ATTENTION_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor q_positions, Tensor? kv_valid, Tensor? inv_freq, *, "
    "int layer, float scale, float softcap=0., int model_window=0, "
    "int rotary_dim=0, int rope_layout=0, "
    "int dense_below_tokens=8192, int block_size_q=64, int sink_tokens=256, "
    "int window_tokens=1024, int selected_tokens=2048, "
    "int[] stage_chunks=[256, 32, 8], int[] stage_keeps=[32768, 8192, 2048], "
    "int pruning_rope=0, int remap_beyond_tokens=-1, int[] refresh_intervals=[], "
    "int first_probes=8, int exact_probe_blocks=0, int first_stage_blocks=1, "
    "bool per_kv_head=False) -> Tensor"
)

# rope_layout values: how the model rotated q and k before attention (0: no RoPE found).
ROPE_NONE, ROPE_ROTATE_HALF, ROPE_INTERLEAVED = 0, 1, 2
# pruning_rope values (positions given to keys while scoring chunks) and remap_beyond_tokens
# (-1: never remap) are chosen per layer by ihip_compile.layer_policy.
# refresh_intervals: decode steps between recomputations of each pruning stage (mask caching,
# kernels/decode_selection_cache.py); empty: recompute every step.
# first_probes: parts of each chunk probed in a pruning stage's first step (a power of two >= 2;
# 2 is plain halving; kernels/prune_stage_ref.py). exact_probe_blocks: selections for at most
# this many query blocks probe every key of a chunk instead (block_selection.select_blocks).
# first_stage_blocks: neighbouring query blocks of a prefill that share the first pruning stage.
# per_kv_head: one block selection per KV head instead of one per layer (selection_scope.py).

_lib = torch.library.Library("ihip", "DEF")
_lib.define("attention" + _ATTENTION_SCHEMA)


def _attention(
    q, k, v, q_positions, kv_valid, inv_freq, *, layer, scale, softcap=0.0, model_window=0,
    rotary_dim=0, rope_layout=0, dense_below_tokens=8192, block_size_q=64, sink_tokens=256,
    window_tokens=1024, selected_tokens=2048, stage_chunks=(256, 32, 8),
    stage_keeps=(32768, 8192, 2048), pruning_rope=0, remap_beyond_tokens=-1,
    refresh_intervals=(), first_probes=DEFAULT_FIRST_PROBES, exact_probe_blocks=0,
    first_stage_blocks=1, per_kv_head=False,
):
    scalars = {name: value for name, value in locals().items()
               if name not in ("q", "k", "v", "q_positions", "kv_valid", "inv_freq")}
    if is_offload_proxy(k):  # keys in host memory (OffloadedCache): kernels/offloaded_attention.py
        return offloaded_attention(
            q, k, v, q_positions, kv_valid, inv_freq, attend=_attention,
            sparse_path=lambda *inputs: _takes_sparse_path(*inputs, model_window,
                                                           dense_below_tokens), **scalars,
        )
    if kv_valid is not None and model_window == 0 and k.shape[-2] >= dense_below_tokens:
        length = valid_prefix(kv_valid)  # a device sync, once per mask tensor
        if length is not None:  # a static cache's unused slots: attend a cache of L keys
            k, v, kv_valid = k[:, :, :length], v[:, :, :length], None
    if q.shape[-2] > 1:
        # A prefill starts a sequence: its first decode step must not continue a selection of
        # the previous one (whose first key, a BOS token, may well be the same).
        DENSE_PATH_STATES.forget(layer)
    if not _takes_sparse_path(q, k, v, kv_valid, model_window, dense_below_tokens):
        return dense_attention(
            q, k, v, q_positions, kv_valid, scale=scale, softcap=softcap, model_window=model_window
        )
    sparse = sparse_kwargs(scalars, k.shape[-2], use_triton=q.is_cuda)
    if refresh_intervals and q.shape[-2] == 1:  # decode with mask caching
        return cached_sparse_decode(q, k, v, q_positions, inv_freq=inv_freq, layer=layer,
                                    refresh_intervals=refresh_intervals, **sparse)
    return sparse_attention(q, k, v, q_positions, inv_freq=inv_freq, **sparse)


def _takes_sparse_path(q, k, v, kv_valid, model_window, dense_below_tokens) -> bool:
    """Sparse only at long keys and for inputs the sparse kernels model (see the docstring)."""
    if k.shape[-2] < dense_below_tokens or model_window > 0:
        return False
    reason = _no_sparse_path_for(q, v, kv_valid)
    if reason is not None:
        _warn_once(reason, k.shape[-2])
        return False
    return True


def _no_sparse_path_for(q, v, kv_valid) -> str | None:
    """Why long-context inputs cannot take the sparse path, or None."""
    # generate() always passes a padding mask; one that hides nothing is no padding. Checked only
    # at long contexts, once per mask tensor (a device sync; ``padding_check``).
    if kv_valid is not None and not hides_nothing(kv_valid):
        return ("a row of the batch has padding (the sparse kernels attend every key of a "
                "row); run padded sequences one at a time, or unpadded")
    if q.device.type not in ("cpu", "cuda"):
        return f"inputs on {q.device.type} (the sparse path runs on cpu and cuda)"
    allowed = GPU_DTYPES if q.is_cuda else REFERENCE_DTYPES
    if q.dtype not in allowed:
        taken = ", ".join(sorted(map(str, allowed)))
        return f"dtype {q.dtype} on {q.device.type} (the sparse path takes {taken})"
    if v.shape[-1] != q.shape[-1]:
        return (f"value head dim {v.shape[-1]} differs from the query's {q.shape[-1]} (the "
                "sparse kernels need them equal)")
    return None


_WARNED: set[str] = set()


def _warn_once(reason: str, s_k: int) -> None:
    """A long context on the exact dense path is slow and may not fit: say so, once per reason."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("infinitehip: attention over %d keys takes the exact dense path: %s",
                    s_k, reason)


def _attention_contiguous(*args, **kwargs):
    # The fake returns a contiguous [B, H, S_Q, D_V] tensor and Inductor asserts the real output's
    # strides against it; SDPA on CPU returns a [B, S_Q, H, D_V]-strided view.
    return _attention(*args, **kwargs).contiguous()


torch.library.impl("ihip::attention", "CompositeExplicitAutograd", lib=_lib)(_attention_contiguous)


@torch.library.register_fake("ihip::attention", lib=_lib)
def _attention_fake(q, k, v, q_positions, kv_valid, inv_freq, **_scalars):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
