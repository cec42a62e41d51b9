"""The graph reports of the tiny models equal the golden copies in reports/graphs.

A change in what the passes match or emit shows up here as a failing diff. When the change is
intended, regenerate and review the diff in git:
    IHIP_REGEN_GOLDEN=1 python -m pytest tests/e2e/test_golden_reports.py
(or ``python -m ihip_compile report --model golden --out reports/graphs``).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

from ihip_compile.report_models import GOLDEN_MODELS, stack_versions, write_model_report

GOLDEN = Path(__file__).resolve().parents[2] / "reports" / "graphs"
REGENERATE = os.environ.get("IHIP_REGEN_GOLDEN") == "1"


def _golden_versions() -> dict:
    path = GOLDEN / "versions.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _without_config(text: str, name: str) -> list[str]:
    """The report minus its configuration listing: a new option elsewhere in the project is not
    a change in what the passes do (what they emit still shows in the graph diff)."""
    if name.endswith(".json"):
        data = json.loads(text)
        data.pop("config")
        return json.dumps(data, indent=1, sort_keys=True).splitlines()
    lines = text.splitlines()
    start, end = lines.index("## Configuration"), lines.index("## Graph diff")
    return lines[:start] + lines[end:]


@pytest.mark.parametrize("model", GOLDEN_MODELS)
def test_report_matches_golden(model, tmp_path):
    if REGENERATE:
        write_model_report(model, GOLDEN)
        (GOLDEN / "versions.json").write_text(json.dumps(stack_versions(), indent=1,
                                                         sort_keys=True) + "\n")
        return
    if _golden_versions() != stack_versions():
        # CI pins the stack the golden files were made with: there a mismatch is a failure.
        if os.environ.get("IHIP_REQUIRE_GOLDEN") == "1":
            pytest.fail(f"golden reports were made with {_golden_versions()}, CI runs "
                        f"{stack_versions()}: pin the same versions or regenerate")
        pytest.skip(f"golden reports were made with {_golden_versions()}, this is "
                    f"{stack_versions()}: graph text differs between versions")
    produced = write_model_report(model, tmp_path)
    for name in ("graph_00.md", "graph_00.json"):
        expected = _without_config((GOLDEN / model / name).read_text(), name)
        actual = _without_config((produced / name).read_text(), name)
        diff = "\n".join(difflib.unified_diff(expected, actual, "golden", "now", lineterm=""))
        assert not diff, f"{model}/{name} changed (IHIP_REGEN_GOLDEN=1 to accept):\n{diff[:4000]}"
    assert sorted(p.name for p in produced.iterdir()) == ["graph_00.json", "graph_00.md"]


def test_report_is_deterministic(tmp_path):
    first = write_model_report("gpt_fast", tmp_path / "a")
    second = write_model_report("gpt_fast", tmp_path / "b")
    for name in ("graph_00.md", "graph_00.json"):
        assert (first / name).read_text() == (second / name).read_text()
        assert str(tmp_path) not in (first / name).read_text()
