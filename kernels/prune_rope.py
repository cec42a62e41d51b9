"""The pruning RoPE of a probed key as a ``@triton.jit`` helper, for the kernels that score chunks.

Spec: ``prune_stage_ref.probe_key_delta`` (the modes and their positions are described there).
"""

import triton
import triton.language as tl

from ihip_compile.kernels.prune_stage_ref import RELATIVE_QUERY_DISTANCE

# jit code reads module globals only as tl.constexpr.
_QUERY_DISTANCE = tl.constexpr(RELATIVE_QUERY_DISTANCE)


@triton.jit
def probe_delta(probe, block_pos, n_chunks, window_tokens, CHUNK: tl.constexpr,
                ROPE_MODE: tl.constexpr):
    """Rotation (in positions) of the keys at indices ``probe`` scored for a query block whose
    last query is at ``block_pos``; ROPE_MODE 1 relative, 2 chunk-indexed, else none (zeros)."""
    if ROPE_MODE == 1:
        delta = block_pos - _QUERY_DISTANCE - probe
    elif ROPE_MODE == 2:
        query_at = tl.minimum(block_pos, n_chunks + window_tokens)
        delta = probe // CHUNK - probe - (query_at - block_pos)
    else:
        delta = probe * 0
    return delta
