"""Benchmarks: ``python -m ihip_compile.bench <name> [args]``.

Each benchmark is a module ``ihip_compile.bench.<name>`` with ``main(argv) -> int``; results go to
``reports/bench/`` (JSON, a markdown table, a plot when matplotlib is installed).
"""

import json


def print_and_save(result: dict, out: str | None) -> None:
    """A measurement script's ending: its result as one JSON line, and in ``out`` when given."""
    print(json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
