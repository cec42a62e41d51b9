"""``python -m ihip_compile ask``: a long text file and a question in, the model's answer out."""

from __future__ import annotations

import json

import pytest

from ihip_compile import __main__ as cli
from ihip_compile.eval.data import PASSKEY_FILLER

# Small budgets, so that a 2k-token prompt takes the sparse path on the CPU (as demo's cpu-small).
SPARSE = {"dense_below_tokens": 1024, "sink_tokens": 64, "sliding_window_tokens": 256,
          "selected_tokens": 256, "stages": [[64, 2048], [16, 512], [8, 256]],
          "refresh_intervals": [4, 2, 1]}


def test_missing_and_empty_files_are_named(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for path, says in ((tmp_path / "absent.txt", "is not a readable file"), (empty, "no text")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["ask", "--file", str(path), "--question", "Why?"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert str(path) in err and says in err


def test_bad_options_are_named(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    with pytest.raises(SystemExit):
        cli.main(["ask", "--file", str(doc), "--question", "Why?", "--options",
                  '{"no_such_option": 1}'])
    assert "no_such_option" in capsys.readouterr().err


@pytest.mark.parametrize("offload", [False, True])
def test_answers_from_a_long_file_on_the_sparse_path(tmp_path, capsys, offload):
    key = "48213"
    doc = tmp_path / "doc.txt"
    doc.write_text(PASSKEY_FILLER * 40 + f"The pass key is {key}. Remember it. {key} is the "
                   f"pass key. " + PASSKEY_FILLER * 40)
    argv = ["ask", "--file", str(doc), "--question",
            "What is the pass key? Answer with the number only.", "--max-new-tokens", "12",
            "--device", "cpu", "--options", json.dumps(SPARSE)] + (["--offload"] if offload else [])
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert key in out
    assert "prefill" in err and "new tokens" in err
    prompt_tokens = int(err.split("prompt: ")[1].split(" tokens")[0].replace(",", ""))
    assert prompt_tokens > SPARSE["dense_below_tokens"]
