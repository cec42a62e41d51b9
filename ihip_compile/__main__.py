"""``python -m ihip_compile <command> [args]``: each command is a module with ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("ihip_compile.demo", "SmolLM2 answers over a long context through the backend"),
    "eval": ("ihip_compile.eval.__main__", "accuracy: perplexity and passkey, dense vs ours"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {about}" for name, (_, about) in sorted(COMMANDS.items())]
        print("usage: python -m ihip_compile <command> [args]\n" + "\n".join(lines))
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
