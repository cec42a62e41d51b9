"""The attention benchmark's decode section runs on CPU (the kernels' references) at a small
context, times both attention paths and averages each refresh preset over its whole cycle."""

import json

import pytest

from ihip_compile.bench import attention


def test_decode_section_reports_both_paths_over_whole_cycles(tmp_path):
    argv = ["--contexts", "4096", "--prefill-contexts", "0", "--quality-contexts", "0",
            "--reps", "1", "--out", str(tmp_path)]
    assert attention.main(argv) == 0
    (row,) = json.loads((tmp_path / "attention.json").read_text())["contexts"]
    decode = row["decode"]
    kinds = ("from_stage_0", "from_stage_1", "from_stage_2", "cached")
    for steps, presets in ((decode["steps_ms"], decode["presets"]),
                           (decode["gathered_steps_ms"], decode["gathered_presets"])):
        assert all(steps[kind] > 0 for kind in kinds)
        for name, counts in (("32/16/8", [1, 1, 2, 28]), ("96/24/8", [1, 3, 8, 84])):
            preset = presets[name]
            assert preset["cycle_counts"] == counts
            mean = sum(c * steps[kind] for c, kind in zip(counts, kinds)) / sum(counts)
            assert preset["avg_ms"] == pytest.approx(mean)
            assert preset["speedup"] == pytest.approx(decode["dense_ms"] / mean)
    assert "| 4096 |" in (tmp_path / "attention.md").read_text()


def test_prefill_section_times_the_parts_and_counts_needles(tmp_path):
    argv = ["--contexts", "4096", "--prefill-contexts", "4096", "--quality-contexts", "4096",
            "--prefill-chunk", "256", "--first-stage-blocks", "2", "--trials", "2", "--reps", "1",
            "--out", str(tmp_path)]
    assert attention.main(argv) == 0
    (row,) = json.loads((tmp_path / "attention.json").read_text())["contexts"]
    prefill = row["prefill"]
    assert prefill["ours_ms"] > 0 and prefill["speedup"] == pytest.approx(
        prefill["dense_ms"] / prefill["ours_ms"])
    assert set(prefill["parts_ms"]) == {"stage_0_to_2", "stage_1_to_2", "stage_2", "attention"}
    for kind in ("block_needle", "four_query_needle"):
        assert prefill["needles"][kind]["trials"] == 2
        assert 0 <= prefill["needles"][kind]["found"] <= 2
    assert "Prefill needles at 4096" in (tmp_path / "attention.md").read_text()
