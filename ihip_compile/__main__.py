"""Command line: ``python -m ihip_compile <command>``.

    report --model llama --out reports/graphs   graph-diff report of a tiny test model
    demo [args]                                 the main job (see ihip_compile/demo.py)
    ask --file F --question Q [args]            answer about a long text file (ihip_compile/ask.py)
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ihip_compile.report_models import (
        GOLDEN_MODELS, available_models, stack_versions, write_model_report,
    )

    names = GOLDEN_MODELS if args.model == "golden" else \
        available_models() if args.model == "all" else (args.model,)
    for name in names:
        target = write_model_report(name, args.out)
        summary = (target / "graph_00.md").read_text().splitlines()[2]
        print(f"{name}: {summary}  ({target})")
    versions = Path(args.out) / "versions.json"
    versions.write_text(json.dumps(stack_versions(), indent=1, sort_keys=True) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("demo", "ask"):
        # These parse their own arguments; imported only when asked for.
        return importlib.import_module(f"ihip_compile.{argv[0]}").main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m ihip_compile")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="graph-diff report of a tiny test model")
    report.add_argument("--model", default="llama",
                        help="a tiny model name, 'golden' (the golden set) or 'all'")
    report.add_argument("--out", default="reports/graphs", help="output directory")
    commands.add_parser("demo", help="the main job (SmolLM2 through the backend)")
    commands.add_parser("ask", help="answer a question about a long text file")
    args = parser.parse_args(argv)
    try:
        return _report(args)
    except ValueError as error:
        parser.error(str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
