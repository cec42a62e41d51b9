"""The end-to-end benchmark runs its code paths at tiny shapes on CPU and writes its JSON."""

import json

from ihip_compile.bench import e2e

SPARSE_TINY = ('{"dense_below_tokens": 64, "sink_tokens": 8, "sliding_window_tokens": 16, '
               '"selected_tokens": 32, "stages": [[32, 64], [16, 32], [8, 32]]}')


def test_e2e_smoke_writes_decode_ttft_and_capacity(tmp_path):
    argv = ["--tiny", "--layers", "1", "--contexts", "96", "--ttft-context", "70",
            "--chunk-tokens", "32", "--backend", "infinitehip_eager", "--refresh", "4,4,2",
            "--gpu-cache-tokens", "512", "--dense-steps", "1",
            "--sections", "decode,ttft,capacity", "--options", SPARSE_TINY,
            "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    result = json.loads((tmp_path / "e2e.json").read_text())
    (row,) = result["decode"]
    assert row["ours"]["tokens_per_s"] > 0 and row["dense"]["tokens_per_s"] > 0
    steps = row["ours"]["ms_steps"]
    assert len(steps) == row["ours"]["steps"] == 4
    assert abs(sum(steps) / len(steps) - row["ours"]["ms_per_token"]) < 1e-2
    assert row["ours_gpu_kv"]["tokens_per_s"] > 0 and row["speedup_gpu_kv"] > 0
    assert row["ours_static_kv"]["tokens_per_s"] > 0 and row["speedup_static_kv"] > 0
    assert row["dense_static_kv"]["tokens_per_s"] > 0
    assert 0 <= row["hit_ratio"]["attention"] <= 1
    # Every other step of a 4,4,2 schedule refreshes nothing. With a bank that holds the whole
    # selection such a step misses at most the one block its window has just entered.
    between = row["between_refreshes"]
    assert between["steps"] == 2 and between["attention_hits"] > 0
    assert between["attention_misses"] <= between["steps"]
    assert result["ttft"]["ours_s"] > 0 and "dense_estimate_s" in result["ttft"]
    assert result["capacity"]["ours_max_tokens"] > 0
    table = (tmp_path / "e2e.md").read_text()
    assert "## Decode" in table and "ours tok/s (static cache on the GPU)" in table
