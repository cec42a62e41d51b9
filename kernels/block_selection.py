"""Hierarchical block selection: pruning stages as data, chained on the device without host syncs.

Stage i splits every candidate into ``stage_chunks[i]``-token chunks, scores each chunk with one
probe search (``prune_stage_ref`` is the spec, ``prune_stage`` the Triton kernel) and keeps the
best ``stage_keeps[i]`` tokens' worth of chunks. Between stages, on the device with shapes fixed
by the arguments (so the whole chain can be captured in a CUDA graph), the hand-off
(``stage_handoff_ref`` is the spec, ``stage_handoff`` one Triton launch):
    top-k of the chunk scores -> empty slots (-inf) become -1 -> sort by position (-1 last)
    -> split each kept chunk into the next stage's chunks
The last stage keeps ``min(stage_keeps[-1], selected_tokens)`` tokens; its chunks are the
8-token (``BLOCK_K``) blocks the attention reads.

Per query block (``block_size_q`` queries, or all S_Q queries when fewer), candidates are keys in
``[sink_tokens, key_hi)`` with ``key_hi = last query position - window_tokens + 1``: every older
key that is neither a sink nor in the sliding window of the block's last query. The attention
masks per query, so overlaps with a query's own window are never counted twice.

Reuse across decode steps: ``select_blocks(..., return_stages=True)`` returns each stage's kept
chunk starts; ``select_blocks(..., start_stage=i, candidates=stages[i - 1])`` re-runs only stages
i.. from a cached output of stage i - 1.
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.prune_stage_ref import DEFAULT_FIRST_PROBES, score_chunks_ref
from ihip_compile.kernels.positioned_scoring import positioned_scoring_inputs, probes_per_chunk
from ihip_compile.kernels.stage_handoff_ref import stage_handoff_ref

# A decode step (one query block, keys in GPU memory) probes at least one key in every 8 of a
# first-stage chunk in each stage's first step: 32 of 256 keys at stage 0 by default, and the
# smaller chunks of later stages are then scored exactly. A run of 8 or more high-scoring keys is
# always probed. H200 at 1M keys (reports/bench/decode_probes/): isolated 8-key needles 10/10
# instead of 2/10, decode over a 32/16/8 cycle 25.9x dense instead of 27.6x. Prefill keeps
# ``first_probes`` (its stage 0 runs for every query block) except in a prompt's last block,
# where a question usually ends, and so do keys in host memory (each probe there is a read over
# PCIe).
DECODE_KEYS_PER_PROBE = 8


def query_blocks(q_positions: torch.Tensor, batch: int, s_q: int, block_size_q: int):
    """Query block size actually used and each block's first/last position, both [B, NQB] int32."""
    pos = q_positions if q_positions.dim() == 2 else q_positions.unsqueeze(0)
    pos = pos.expand(batch, s_q).to(torch.int32)
    block_q = min(block_size_q, 1 << (s_q - 1).bit_length())
    n_blocks = -(-s_q // block_q)
    pad = n_blocks * block_q - s_q
    if pad:
        pos = torch.cat([pos, pos[:, -1:].expand(batch, pad)], dim=1)
    if block_q == 1:  # decode: each block is one query (skips two reductions per step)
        return block_q, pos, pos
    blocks = pos.view(batch, n_blocks, block_q)
    return block_q, blocks.amin(-1), blocks.amax(-1)


def pool_queries(q: torch.Tensor, block_q: int, pool: int) -> torch.Tensor:
    """[B, H, S_Q, D] -> [B, H, NQB, block_q // pool, D]: mean of ``pool`` consecutive queries.

    The last block is padded by repeating the last query (it only adds a duplicate to a max).
    """
    b, h, s_q, d = q.shape
    n_blocks = -(-s_q // block_q)
    pad = n_blocks * block_q - s_q
    if pad:
        q = torch.cat([q, q[:, :, -1:].expand(b, h, pad, d)], dim=2)
    if pool == 1 and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # The mean of one query, through fp32 and back, is that query: no copies at decode.
        return q.reshape(b, h, n_blocks, block_q, d)
    # Summed in fp32 without an fp32 copy of q (one pass over a 32k chunk's queries, not three).
    pooled = q.reshape(b, h, n_blocks, block_q // pool, pool, d).mean(4, dtype=torch.float32)
    return pooled.to(q.dtype)


def query_view(q, positions, block_size_q: int, pool: int, *, sink_tokens: int,
               window_tokens: int, s_k: int):
    """(block_q, pooled queries, last position and candidate end per block) for one block size."""
    b, _, s_q, _ = q.shape
    block_q, _, pos_max = query_blocks(positions, b, s_q, block_size_q)
    q_pooled = pool_queries(q, block_q, min(pool, block_q))
    return block_q, q_pooled, pos_max, candidate_window_end(pos_max, sink_tokens, window_tokens,
                                                            s_k)


def candidate_window_end(pos_max: torch.Tensor, sink_tokens: int, window_tokens: int, s_k: int):
    """Exclusive end of the selectable keys per query block: where the window begins."""
    # One add and one clamp (min > max gives max, as the two clamps in sequence would).
    return (pos_max + (1 - window_tokens)).clamp(min=sink_tokens, max=s_k).to(torch.int32)


def blocks_sharing_first_stage(first_stage_blocks: int, n_blocks: int, n_stages: int,
                               start_stage: int) -> int:
    """Query blocks per first-stage selection: ``first_stage_blocks`` (at most the blocks there
    are, rounded up to a power of two), or 1 when the first stage is not run or is the last."""
    if first_stage_blocks < 1 or first_stage_blocks & (first_stage_blocks - 1):
        raise ValueError(f"first_stage_blocks must be a power of two >= 1, got "
                         f"{first_stage_blocks}")
    if start_stage > 0 or n_stages == 1 or n_blocks == 1:
        return 1
    return min(first_stage_blocks, 1 << (n_blocks - 1).bit_length())


def _check_stages(stage_chunks, stage_keeps, selected_tokens):
    if len(stage_chunks) == 0 or len(stage_chunks) != len(stage_keeps):
        raise ValueError(
            f"stage_chunks and stage_keeps need the same non-zero length, got {list(stage_chunks)}"
            f" and {list(stage_keeps)}"
        )
    for i, (chunk, keep) in enumerate(zip(stage_chunks, stage_keeps)):
        if chunk < 1 or chunk & (chunk - 1) or keep < chunk or keep % chunk:
            raise ValueError(
                f"stage {i}: chunk size must be a power of two and keep a multiple of it, "
                f"got chunk {chunk}, keep {keep}"
            )
        if i and (chunk > stage_chunks[i - 1] or keep > stage_keeps[i - 1]):
            raise ValueError(f"stages must shrink, got {list(zip(stage_chunks, stage_keeps))}")
    if selected_tokens < stage_chunks[-1] or selected_tokens % stage_chunks[-1]:
        raise ValueError(
            f"selected_tokens must be a positive multiple of the last chunk size "
            f"({stage_chunks[-1]}), got {selected_tokens}"
        )


def select_blocks(
    q: torch.Tensor,  # [B, H, S_Q, D]
    k: torch.Tensor,  # [B, H_KV, S_K, D]
    q_positions: torch.Tensor,  # [S_Q] or [B, S_Q] key index of each query
    *,
    block_size_q: int = 64,
    sink_tokens: int = 256,
    window_tokens: int = 1024,
    selected_tokens: int = 2048,
    stage_chunks=(256, 32, 8),
    stage_keeps=(32768, 8192, 2048),
    rope_mode: int = 0,
    inv_freq: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_layout: int = 0,
    query_pool: int = 4,
    first_stage_blocks: int = 1,
    first_probes: int = DEFAULT_FIRST_PROBES,
    exact_probe_blocks: int = 0,
    start_stage: int = 0,
    end_stage: int | None = None,
    candidates: torch.Tensor | None = None,
    return_stages: bool = False,
    use_triton: bool | None = None,
):
    """Sorted selected block indices [B, NQB, TOPK] int32 (block j = keys [8j, 8j + 8)), -1 last.

    With ``return_stages=True`` returns ``(block_indices, stages)``: the kept chunk starts of each
    stage run, ``stages[j]`` for stage ``start_stage + j`` ([B, NQB, keep / chunk] int32, sorted,
    -1 last). ``candidates`` for ``start_stage=i`` is such an output of stage i - 1.
    ``end_stage`` (default: all stages) stops before that stage: the first value returned is
    then the next stage's chunk starts, not blocks.
    With at most ``exact_probe_blocks`` query blocks (a decode step, a short prompt), each stage
    scores every key of its chunks (exact chunk maxima) instead of the ``first_probes`` search,
    unless the keys lie in host memory (``BlockMajorKeys``: it would read them all over PCIe).
    A single query block probes at least one key in ``DECODE_KEYS_PER_PROBE`` of the first
    stage's chunks (same exception), and so do the blocks holding the last ``block_size_q``
    queries of a whole run with several (a prompt's end): each is selected again on its own.
    ``first_stage_blocks`` neighbouring query blocks (a power of two) share the first of several
    stages: scored as one block of their queries, pooled ``first_stage_blocks`` times more (as
    many pooled queries as one block has), then every block runs the later stages on its own
    copy of the kept chunks. A prefill's first stage, which probes the whole cache for each
    query block, costs that many times less.
    """
    options = {name: value for name, value in locals().items()
               if name not in ("q", "k", "q_positions")}
    _check_stages(stage_chunks, stage_keeps, selected_tokens)
    if not 0 <= start_stage < len(stage_chunks):
        raise ValueError(f"start_stage must be in [0, {len(stage_chunks)}), got {start_stage}")
    if end_stage is None:
        end_stage = len(stage_chunks)
    if not start_stage < end_stage <= len(stage_chunks):
        raise ValueError(f"end_stage must be in ({start_stage}, {len(stage_chunks)}], "
                         f"got {end_stage}")
    if (start_stage > 0) != (candidates is not None):
        raise ValueError("candidates (stage start_stage - 1's output) is needed iff start_stage > 0")
    b, s_k = q.shape[0], k.shape[2]
    keys_in_host = isinstance(k, BlockMajorKeys)
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        from ihip_compile.kernels.prune_stage import score_chunks
        from ihip_compile.kernels.stage_handoff import stage_handoff as handoff
    else:
        score_chunks, handoff = score_chunks_ref, stage_handoff_ref
        if not isinstance(k, torch.Tensor):  # the reference reads plain tensors only
            k = k.as_tensor()
    positions = q_positions.to(q.device)
    window = dict(sink_tokens=sink_tokens, window_tokens=window_tokens, s_k=s_k)
    block_q, q_pooled, pos_max, key_hi = query_view(q, positions, block_size_q, query_pool,
                                                    **window)
    n_blocks = pos_max.shape[1]
    share = blocks_sharing_first_stage(first_stage_blocks, n_blocks, len(stage_chunks),
                                       start_stage)
    # The first stage's view of the queries: ``share`` neighbouring blocks as one.
    first_view = (q_pooled, pos_max, key_hi) if share == 1 else query_view(
        q, positions, block_q * share, min(query_pool, block_q) * share, **window)[1:]
    keeps = list(stage_keeps)
    keeps[-1] = min(keeps[-1], selected_tokens)
    if start_stage == 0:
        first = stage_chunks[0]
        starts = torch.arange(0, s_k, first, device=k.device, dtype=torch.int32)
        starts = starts.expand(b, first_view[1].shape[1], -1)
    else:
        _, starts = handoff(None, candidates, 0, stage_chunks[start_stage - 1],
                            stage_chunks[start_stage], keep_kept=False)
    rope = dict(inv_freq=inv_freq, rotary_dim=rotary_dim, rope_layout=rope_layout)
    moved = {}  # keys moved to where a pruning RoPE mode scores them, shared between stages
    exact = n_blocks <= exact_probe_blocks and not keys_in_host
    decode = n_blocks == 1 and not keys_in_host
    probe_floor = stage_chunks[0] // DECODE_KEYS_PER_PROBE if decode else 0
    stages = []
    for i in range(start_stage, end_stage):
        chunk = stage_chunks[i]
        probes = chunk if exact else max(first_probes, min(chunk, probe_floor))
        view_q, view_pos, view_hi = first_view if i == 0 else (q_pooled, pos_max, key_hi)
        stage_q, stage_k, stage_mode = positioned_scoring_inputs(
            view_q, k, view_pos, rope_mode, rope, chunk_size=chunk, window_tokens=window_tokens,
            n_probed=starts.numel() * probes_per_chunk(chunk, probes),
            use_triton=use_triton, memo=moved)
        scores = score_chunks(
            stage_q, stage_k, starts, view_hi, view_pos, key_lo=sink_tokens, chunk_size=chunk,
            rope_mode=stage_mode, window_tokens=window_tokens, first_probes=probes, **rope,
        )
        # The last stage's chunks become block indices (start // chunk); earlier stages hand
        # the next one the sub-chunks of what they keep.
        last = i == len(stage_chunks) - 1
        kept, starts = handoff(scores, starts, keeps[i] // chunk, chunk,
                               chunk if last else stage_chunks[i + 1], block_div=chunk if last else 1)
        if i == 0 and share > 1:  # each block of a shared first stage gets its own copy
            kept, starts = (t.repeat_interleave(share, dim=1)[:, :n_blocks]
                            for t in (kept, starts))
        stages.append(kept)
    whole_run = start_stage == 0 and end_stage == len(stage_chunks) and not return_stages
    if n_blocks > 1 and whole_run and not keys_in_host:
        starts = _reselect_last_queries(q, k, positions, starts, block_q, options)
    return (starts, stages) if return_stages else starts


def _reselect_last_queries(q, k, positions, starts, block_q: int, options: dict):
    """``starts`` [B, NQB, TOPK] with the blocks holding a call's last ``block_q`` queries (the
    last block, and the one before it when the last is partial) selected each on its own, as a
    single block is: with the probe floor. A prompt's question usually ends there, and the
    answer's evidence is what those queries find (SmolLM2's pass keys at 64k, CPU: 6 of 10 found
    instead of 1 of 10, reports/eval/question_blocks.md; no gain at 1M)."""
    s_q, n_blocks = q.shape[2], starts.shape[1]
    first = n_blocks - (1 if s_q % block_q == 0 else 2)
    single = {**options, "first_stage_blocks": 1}
    parts = [select_blocks(q[:, :, lo: lo + block_q], k, positions[..., lo: lo + block_q],
                           **single) for lo in range(first * block_q, s_q, block_q)]
    return torch.cat([starts[:, :first], *parts], dim=1)
