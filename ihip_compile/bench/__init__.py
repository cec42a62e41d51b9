"""Benchmarks: ``python -m ihip_compile.bench <name> [args]``.

Each benchmark is a module ``ihip_compile.bench.<name>`` with ``main(argv) -> int``; results go to
``reports/bench/`` (JSON, a markdown table, a plot when matplotlib is installed).
"""
