"""The end-to-end benchmark runs its code paths at tiny shapes on CPU and writes its JSON."""

import json

import pytest
import torch

from ihip_compile.bench import e2e
from ihip_compile.kernels import kv_store

SPARSE_TINY = ('{"dense_below_tokens": 64, "sink_tokens": 8, "sliding_window_tokens": 16, '
               '"selected_tokens": 32, "stages": [[32, 64], [16, 32], [8, 32]]}')


def test_e2e_smoke_writes_decode_ttft_and_capacity(tmp_path):
    argv = ["--tiny", "--layers", "1", "--contexts", "96", "--ttft-context", "70",
            "--chunk-tokens", "32", "--dense-chunk-tokens", "16", "--backend",
            "infinitehip_eager", "--refresh", "4,4,2",
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
    # steps replayed as one CUDA graph, captured, or not; inputs a replay copies
    counts = row["whole_step_graph"]
    assert set(counts) == {"replays", "captures", "observed", "staged_inputs"}
    if not torch.cuda.is_available():  # decode graphs are segmented for CUDA only
        assert not any(counts.values())
    # Every other step of a 4,4,2 schedule refreshes nothing. With a bank that holds the whole
    # selection such a step misses at most the one block its window has just entered.
    between = row["between_refreshes"]
    assert between["steps"] == 2 and between["attention_hits"] > 0
    assert between["attention_misses"] <= between["steps"]
    assert result["ttft"]["ours_s"] > 0 and "dense_estimate_s" in result["ttft"]
    ttft = result["ttft"]
    assert ttft["ours_first_prompt_s"] > 0 and ttft["ratio_first_prompt_over_dense"] > 0
    assert ttft["warm_up_tokens"] == 70  # the whole prompt: shorter than three chunks
    # Dense's own chunk: 70 tokens in chunks of 16 are 5 chunks, the last one sampled.
    assert result["ttft"]["dense_chunk_tokens"] == 16
    assert max(s["chunk_index"] for s in result["ttft"]["dense_chunk_samples"]) == 4
    assert result["capacity"]["ours_max_tokens"] > 0
    table = (tmp_path / "e2e.md").read_text()
    assert "## Decode" in table and "ours tok/s (static cache on the GPU)" in table


def test_the_ttft_warm_up_crosses_the_trained_context_when_the_prompt_does():
    """Past the model's trained context RoPE is remapped, which runs other kernel variants: the
    warm-up goes there too, or the timed prompt would stop there to compile them."""
    from ihip_compile.config import IHipConfig

    model = torch.nn.Module()
    model.config = type("Config", (), {"max_position_embeddings": 100})()
    warm = e2e._warm_up_tokens
    assert warm(IHipConfig(), model, 1000, 32) == 128  # 4 chunks: past 100 keys
    assert warm(IHipConfig(), model, 90, 32) == 90  # the prompt is shorter than three chunks
    assert warm(IHipConfig(trained_context_tokens=300), model, 1000, 32) == 320
    assert warm(IHipConfig(rope_remap="off"), model, 1000, 32) == 96  # never remapped
    assert warm(IHipConfig(), torch.nn.Module(), 1000, 32) == 96  # no trained context known


def test_dense_compiled_is_timed_too_and_the_fastest_dense_is_the_baseline(tmp_path):
    argv = ["--tiny", "--layers", "1", "--contexts", "96", "--backend", "infinitehip_eager",
            "--refresh", "4,4,2", "--dense-steps", "1", "--dense-inductor",
            "--sections", "decode", "--options", SPARSE_TINY, "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    (row,) = json.loads((tmp_path / "e2e.json").read_text())["decode"]
    settings = row["dense_by_sdpa"]
    assert {"default", "default_inductor"} <= set(settings)
    assert row["dense"] == min(settings.values(), key=lambda r: r["ms_per_token"])


def test_max_context_is_the_longest_the_host_memory_holds(monkeypatch):
    model = e2e.build_model(2, torch.device("cpu"), torch.float32, tiny=True)
    heads, dim = e2e.kv_shape(model)
    per_token = 2 * heads * 2 * dim * 4  # 2 layers, K and V, fp32
    room = 100

    def holding(tokens):
        free = e2e.HOST_HEADROOM_BYTES + per_token * tokens
        monkeypatch.setattr(kv_store, "available_host_bytes", lambda: free)

    plain, fp8 = e2e.parse_args([]), e2e.parse_args(["--fp8"])
    fp8_pruning = e2e.parse_args(["--options", '{"fp8_pruning_keys": true}'])
    holding(3 * 65536 + room)
    assert e2e.largest_offloaded_context(model, plain, torch.float32, room) == 3 * 65536
    assert e2e.largest_offloaded_context(model, fp8, torch.float32, room) == 12 * 65536
    # A second copy of the keys in FP8: 9 bytes per key and value element instead of 8.
    holding(9 * 65536 + 2 * room)
    assert e2e.largest_offloaded_context(model, fp8_pruning, torch.float32, room) == 8 * 65536
    holding(3 * 65536 + room - 1)
    assert e2e.largest_offloaded_context(model, plain, torch.float32, room) == 2 * 65536
    holding(65535 + room)
    with pytest.raises(ValueError, match="fewer than one 64k piece"):
        e2e.largest_offloaded_context(model, plain, torch.float32, room)
    assert e2e.parse_args(["--contexts", "max,4096"]).contexts == ["max", 4096]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--contexts", "1M"])


def test_a_gpu_cache_that_does_not_fit_is_a_result_not_a_failure():
    assert not e2e._failed({"dense_error": f"{e2e.GPU_OOM}: tried to allocate 16 GiB",
                            "ours_gpu_kv_error": f"{e2e.GPU_OOM}: tried to allocate 16 GiB"})
    assert e2e._failed({"dense_error": "RuntimeError: something else"})
    assert e2e._failed({"ours_error": f"{e2e.GPU_OOM}: ours must run"})
