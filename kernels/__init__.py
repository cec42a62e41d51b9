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
"""
