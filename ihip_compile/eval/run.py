"""The two measurements, each over lengths and modes, on the same tokens for every mode."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from ihip_compile.eval.data import essay_tokens, passkey_prompt, text_window
from ihip_compile.eval.paths import ModelRunner, greedy_answer, last_logits
from ihip_compile.eval.progress import Progress

PPL_TARGET_TOKENS = 1024
# The window the model is judged against: the same target tokens with only the 4096 tokens that
# end there, well inside any training window. Each length's window ends at another place of the
# text (it repeats past its end), so its targets are other sentences: only this column compares
# like with like.
REFERENCE_WINDOW = 4096
PASSKEY_NEW_TOKENS = 8


def perplexity(runner: ModelRunner, tokenizer, lengths: list[int], modes: list[str],
               device: str) -> list[dict[str, Any]]:
    """Per length: perplexity of the window's last 1024 tokens under each mode, and under the
    dense model given only the window's last ``REFERENCE_WINDOW`` tokens (``dense_last_4k``)."""
    tokens = essay_tokens(tokenizer)
    rows = []
    with Progress(len(lengths) * (len(modes) + 1), "perplexity") as bar:
        for length in lengths:
            if length <= PPL_TARGET_TOKENS:
                raise ValueError(
                    f"perplexity lengths must exceed {PPL_TARGET_TOKENS}, got {length}")
            window = text_window(tokens, length).to(device)
            row = {"length": length, "text_tokens": int(tokens.numel())}
            for mode in modes:
                started = time.perf_counter()
                row[mode] = _last_tokens_perplexity(runner.forward(mode), window)
                row[f"{mode}_seconds"] = round(time.perf_counter() - started, 2)
                bar.update(f"{length} {mode} ppl={row[mode]:.2f}")
            row["dense_last_4k"] = _last_tokens_perplexity(runner.forward("dense"),
                                                           window[:, -REFERENCE_WINDOW:])
            bar.update(f"{length} dense, last {REFERENCE_WINDOW} ppl={row['dense_last_4k']:.2f}")
            rows.append(row)
    return rows


def _last_tokens_perplexity(forward, window: torch.Tensor) -> float:
    # logits at positions N-1025 .. N-2 predict the last 1024 tokens
    logits = last_logits(forward, window, PPL_TARGET_TOKENS + 1)[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, window[0, -PPL_TARGET_TOKENS:])))


def passkey(runner: ModelRunner, tokenizer, lengths: list[int], depths: list[float],
            samples: int, modes: list[str], device: str) -> list[dict[str, Any]]:
    """Per (length, depth, sample): each mode's greedy answer and whether it holds the key."""
    rows = []
    total = len(lengths) * len(depths) * samples * len(modes)
    with Progress(total, "passkey") as bar:
        for length in lengths:
            for depth in depths:
                for sample in range(samples):
                    seed = hash((length, round(depth * 1000), sample)) & 0xFFFFFFFF
                    ids, key = passkey_prompt(tokenizer, length, depth, seed)
                    ids = ids.to(device)
                    row = {"length": length, "depth": depth, "sample": sample, "key": key,
                           "prompt_tokens": int(ids.shape[1])}
                    for mode in modes:
                        answer = tokenizer.decode(
                            greedy_answer(runner.forward(mode), ids, PASSKEY_NEW_TOKENS))
                        row[mode] = {"answer": answer, "correct": answer_has_key(answer, key)}
                        verdict = "ok" if row[mode]["correct"] else "miss"
                        bar.update(f"{length} d={depth:.2f} {mode} {verdict}")
                    rows.append(row)
    return rows


def answer_has_key(answer: str, key: str) -> bool:
    """The first number in the answer is the key (a key merely echoed later does not count)."""
    numbers = re.findall(r"\d+", answer)
    return bool(numbers) and numbers[0] == key
