"""Side-by-side table, JSON and plot of an eval run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tabulate import tabulate


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per length: perplexities (each mode's ratio to its own at 4k, or at the first
    length when 4k was not run; and to the dense model's on the same targets given only the last
    4k tokens, when measured) and passkey accuracy per mode."""
    modes = results["modes"]
    by_length: dict[int, dict[str, Any]] = {}
    ppl = results.get("perplexity", [])
    # The accuracy target compares each length with the same mode's 4k perplexity.
    reference = next((r for r in ppl if r["length"] == 4096), ppl[0] if ppl else None)
    for row in ppl:
        entry = by_length.setdefault(row["length"], {"length": row["length"]})
        for mode in modes:
            entry[f"ppl {mode}"] = round(row[mode], 3)
            entry[f"ppl {mode} / at {reference['length']}"] = round(row[mode] / reference[mode], 3)
        if "dense_last_4k" in row:
            entry["ppl dense, last 4k"] = round(row["dense_last_4k"], 3)
            for mode in modes:
                entry[f"ppl {mode} / dense, last 4k"] = round(row[mode] / row["dense_last_4k"], 3)
    for row in results.get("passkey", []):
        entry = by_length.setdefault(row["length"], {"length": row["length"]})
        for mode in modes:
            hits, count = entry.get(f"passkey {mode}", (0, 0))
            entry[f"passkey {mode}"] = (hits + row[mode]["correct"], count + 1)
    rows = []
    for length in sorted(by_length):
        entry = by_length[length]
        rows.append({k: (f"{v[0]}/{v[1]}" if isinstance(v, tuple) else v) for k, v in entry.items()})
    return rows


def table(results: dict[str, Any]) -> str:
    return tabulate(summary_rows(results), headers="keys", tablefmt="github", missingval="-")


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    header = f"# Accuracy: dense vs infinitehip ({results['model']}, {results['device']})\n\n"
    written[1].write_text(header + table(results) + "\n")
    if importlib.util.find_spec("matplotlib") is not None:
        written.append(_plot(results, out / "results.png"))
    return written


def _plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in results["modes"]:
        ppl = results.get("perplexity", [])
        if ppl:
            left.plot([r["length"] for r in ppl], [r[mode] for r in ppl], marker="o", label=mode)
        acc = {}
        for row in results.get("passkey", []):
            hits, count = acc.get(row["length"], (0, 0))
            acc[row["length"]] = (hits + row[mode]["correct"], count + 1)
        if acc:
            lengths = sorted(acc)
            right.plot(lengths, [acc[n][0] / acc[n][1] for n in lengths], marker="o", label=mode)
    for axis, title in ((left, "perplexity of the last 1024 tokens"), (right, "passkey accuracy")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title)
        axis.legend()
    left.set_yscale("log")
    right.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
