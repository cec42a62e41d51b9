"""Dispatch ``python -m ihip_compile.bench <name> [args]`` to ``ihip_compile.bench.<name>.main``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import ihip_compile.bench as _bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] not in names:
        print(f"usage: python -m ihip_compile.bench {{{','.join(names)}}} [args]", file=sys.stderr)
        return 2
    return importlib.import_module(f"ihip_compile.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
