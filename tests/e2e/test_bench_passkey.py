"""The end-to-end benchmark's pass-key section (SmolLM2, chunked prefill into an OffloadedCache,
then generate()) at a small context on CPU: it runs, sizes its cache for every generated token,
and reports the bank hits of the decode steps that refreshed nothing."""

import json

from ihip_compile.bench import e2e

SMALL = ('{"dense_below_tokens": 512, "sink_tokens": 32, "sliding_window_tokens": 64, '
         '"selected_tokens": 64, "stages": [[32, 256], [16, 128], [8, 64]], '
         '"refresh_intervals": [8, 4, 2]}')


def test_passkey_section_generates_through_the_offloaded_cache(tmp_path):
    new_tokens = 20  # more than the cache's margin used to be
    argv = ["--device", "cpu", "--sections", "passkey", "--passkey-context", "1024",
            "--passkey-new-tokens", str(new_tokens), "--chunk-tokens", "512",
            "--backend", "infinitehip_eager", "--options", SMALL, "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    result = json.loads((tmp_path / "e2e.json").read_text())["passkey"]
    assert result["context"] >= 1000 and isinstance(result["correct"], bool)
    between = result["between_refreshes"]
    # Stage 2 refreshes every other step: half of the decode steps refresh nothing.
    assert between["steps"] >= new_tokens // 2 - 1 and between["attention_hits"] > 0
