"""The tiled pass-key tool: needle placement, its errors, and the command's JSON rows."""

import json

import pytest
import torch

from ihip_compile.eval.tiled_passkey import main, tiled_passkey_cache


@pytest.mark.slow
def test_needle_lands_where_asked_and_the_cache_has_the_length(smollm2):
    model, tokenizer = smollm2
    tiled = tiled_passkey_cache(model, tokenizer, 3000, seed=2, needle_at=1500)
    assert abs(tiled.needle_at - 1500) < 40  # snapped to the filler period
    total = tiled.cache.get_seq_length() + tiled.question.shape[1]
    assert 3000 - 40 < total <= 3000
    with pytest.raises(ValueError, match="outside the filler"):
        tiled_passkey_cache(model, tokenizer, 3000, seed=2, needle_at=5000)
    # A question led by filler periods ends a longer call; the total length stays the same.
    led = tiled_passkey_cache(model, tokenizer, 3000, seed=2, needle_at=1500, question_lead=3)
    assert led.question.shape[1] > 64 + tiled.question.shape[1] // 2
    assert torch.equal(led.question[0, -tiled.question.shape[1]:], tiled.question[0])
    assert 3000 - 40 < led.cache.get_seq_length() + led.question.shape[1] <= 3000


@pytest.mark.slow
def test_command_writes_one_row_per_needle(tmp_path):
    out = tmp_path / "rows.json"
    assert main(["--context", "2048", "--needle-at", "700,1200", "--options",
                 '{"dense_below_tokens": 512}', "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [abs(r["needle_at"] - want) < 40 for r, want in zip(rows, (700, 1200))] == [True] * 2
    assert all(isinstance(r["found"], bool) and 0 <= r["layers_attending_whole_needle"] <= 30
               for r in rows)


def test_forced_blocks_join_every_selection_keeping_order_and_width():
    from ihip_compile.eval.tiled_passkey import _with_blocks

    blocks = torch.tensor([[[3, 9, 20, -1], [1, 2, 5, 7]]], dtype=torch.int32)
    got = _with_blocks(blocks, [6, 9])
    assert got.tolist() == [[[3, 6, 9, 20], [5, 6, 7, 9]]]  # full rows drop their earliest
    assert got.dtype == blocks.dtype
