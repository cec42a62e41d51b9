"""infinitehip kernels: Triton kernels, each beside its pure-PyTorch reference, and the ``ihip::``
custom ops that dispatch to them (``ops.py``).

Shape glossary, used in every shape comment of this package:
    B        batch
    H        query heads          H_KV   key/value heads (GQA: H % H_KV == 0)
    S_Q      query tokens         S_K    key tokens
    D        head dim             D_V    value head dim
    BLOCK_Q  queries per selection block
    BLOCK_K  keys per selected block (the last pruning stage's chunk size)
    TOPK     selected blocks per query block

Causality: query i may attend key j iff ``j <= q_positions[i]`` (its own key index), the key is
valid (``kv_valid[b, j]``), and, with a model sliding window W > 0, ``j > q_positions[i] - W``.

Sparse path (``sparse_attention.sparse_attention``; the op calls it at S_K >= dense_below_tokens).
The kernels take one block list per sequence, shared by that sequence's heads; the op's selection
scope (``selection_scope``) decides what a sequence is: a batch row (one selection per layer) or
each KV head with its query heads (q [B * H_KV, GROUP, S_Q, D], k/v [B * H_KV, 1, S_K, D]):
    block_selection.select_blocks(q, k, q_positions, ...) -> block_indices [B, NQB, TOPK] int32
        hierarchical pruning; NQB = ceil(S_Q / min(block_size_q, S_Q rounded up to a power of 2));
        block j = keys [8j, 8j + 8); sorted, -1 (empty) last. Stages are data
        (stage_chunks, stage_keeps); one stage = prune_stage.score_chunks (Triton) or
        prune_stage_ref.score_chunks_ref, then top-k / sort / split in torch on the device.
    block_sparse_attention.block_sparse_attention(q, k, v, q_positions, block_indices, ...)
        prefill (S_Q > 1): sinks + selected blocks + sliding window, online softmax
    sparse_decode.sparse_decode(q, k, v, block_indices, q_positions, ...)
        decode (S_Q == 1): split-K over the same key list, then a merge kernel; k and v may
        be ``bank_kv.BankKV``: the offloaded cache's attention bank, read in its slots;
        ``window_start`` (a device tensor) ends the window at the query and starts it there,
        so one captured launch serves every step between refreshes (``decode_step_graph``)
    Each has a ``*_ref`` twin (torch only): the spec, and the CPU path of the op.

Reusing the selection across decode steps (mask caching):
    blocks, stages = select_blocks(..., return_stages=True)       # stages[i]: stage i's kept
                                                                   # chunk starts [B, NQB, n_i]
    blocks, tail = select_blocks(..., start_stage=i, candidates=stages[i - 1],
                                 return_stages=True)               # re-run stages i.. only
    out = sparse_decode(q, k, v, blocks, q_positions, window_tokens=W + new_keys, ...)
Keys appended after stage 0 last ran are not candidates; widening the attention's window by
their count keeps them attended (the sets stay disjoint: selected keys inside a query's window
are masked). Under RoPE renumbering the op instead positions a selection once and attends the
copy until its blocks change (same result):
    placed = positioned_kv.position_selected_kv(k, v, blocks, q_positions, ...)  # at a refresh
    out = positioned_decode.positioned_decode(q, k, v, placed, q_positions, ...)  # every step ``rope_mode`` of select_blocks is 0 true positions, 1 relative, 2 chunk-indexed:
map the op's ``pruning_rope`` with ``sparse_attention.pruning_rope_mode(pruning_rope, remap)``.
Where a stage probes many keys per cached key (prefill), ``positioned_scoring`` moves the keys
to their pruning-RoPE positions once and turns the queries instead, so probes need no rotation.
No function here synchronises with the host on the Triton path, so a decode step (selection
included) can be captured in a CUDA graph.
"""
