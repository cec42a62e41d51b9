"""Graph-diff reports: what the passes matched, rewrote and left dense, per compiled graph.

When ``config.report_dir`` is set, each graph the backend compiles gets ``graph_NN.md`` (for
people) and ``graph_NN.json`` (for tools), numbered in compile order per directory. Output is
deterministic: no timestamps, no absolute paths, sorted tables, so the reports of the tiny test
models are kept as golden files under ``reports/graphs/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ihip_compile.pipeline import PipelineResult

_next_index: dict[str, int] = {}


def reset_numbering(report_dir: str | None = None) -> None:
    """Start numbering graphs at 00 again (for one directory, or all)."""
    if report_dir is None:
        _next_index.clear()
    else:
        _next_index.pop(os.path.abspath(report_dir), None)


def report_data(result: PipelineResult, name: str) -> dict[str, Any]:
    config = {k: v for k, v in result.context.config.as_dict().items() if k != "report_dir"}
    diff = list(difflib.unified_diff(
        result.graph_before.splitlines(), result.graph_after.splitlines(),
        "before", "after", lineterm="", n=1,
    ))
    ops = sorted(set(result.ops_before) | set(result.ops_after))
    return {
        "graph": name,
        "summary": {
            "attention_sites": len(result.context.sites) + len(result.context.skips),
            "rewritten": len(result.context.rewrites),
            "left_dense": len(result.context.skips),
        },
        "rewrites": [dataclasses.asdict(r) for r in result.context.rewrites],
        "skips": [dataclasses.asdict(s) for s in result.context.skips],
        "passes": [dataclasses.asdict(r) for r in result.records],
        "removed_nodes": result.context.removed_nodes,
        "cuda_graphs": result.cuda_graphs,
        "trained_context": result.trained_context,
        "op_counts": {op: [result.ops_before[op], result.ops_after[op]] for op in ops},
        "config": config,
        "diff": diff,
    }


def render_markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    out = [
        f"# infinitehip graph report: {data['graph']}",
        "",
        f"{s['rewritten']} of {s['attention_sites']} attention sites rewritten into "
        f"`torch.ops.ihip.attention`; {s['left_dense']} left as they were.",
        "",
        "## Rewrites",
        "",
        _table(data["rewrites"], ["layer", "pattern", "node", "op_node", "scale", "softcap",
                                  "model_window", "rope_layout", "rotary_dim", "inv_freq_source",
                                  "q_positions", "kv_valid", "stripped_repeat_kv"]),
        "",
        "## Left dense",
        "",
        _table(data["skips"], ["layer", "pattern", "node", "reason"]),
        "",
        "## Passes",
        "",
        _table([{**p, "op_delta": ", ".join(f"{k} {v:+d}" for k, v in p["op_delta"].items())}
                for p in data["passes"]],
               ["name", "modified", "nodes_before", "nodes_after", "op_delta"]),
        "",
        "## Op counts",
        "",
        _table([{"op": op, "before": b, "after": a} for op, (b, a) in data["op_counts"].items()],
               ["op", "before", "after"]),
        "",
        f"Removed as dead code: {len(data['removed_nodes'])} nodes.",
        "",
        f"Decode CUDA graphs: {data['cuda_graphs']}.",
        "",
        "## Configuration",
        "",
        f"Trained context (RoPE positions are remapped beyond it with rope_remap='auto'): "
        f"{data['trained_context']}.",
        "",
        *[f"- {k} = {json.dumps(v)}" for k, v in data["config"].items()],
        "",
        "## Graph diff",
        "",
        "```diff",
        *data["diff"],
        "```",
        "",
    ]
    return "\n".join(out)


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    return tabulate([[row.get(c, "") for c in columns] for row in rows], headers=columns,
                    tablefmt="github")


def write_report(result: PipelineResult, report_dir: str) -> Path:
    """Write graph_NN.md and graph_NN.json; return the markdown path."""
    key = os.path.abspath(report_dir)
    index = _next_index.get(key, 0)
    _next_index[key] = index + 1
    name = f"graph_{index:02d}"
    data = report_data(result, name)
    directory = Path(report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    path = directory / f"{name}.md"
    path.write_text(render_markdown(data))
    return path
