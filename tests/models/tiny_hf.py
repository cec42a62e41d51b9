"""Tiny random-weight transformers models, one per family the backend must handle.

Shapes are the smallest that still exercise each family's attention: GQA (4 query heads, 2 KV
heads), two or more layers, partial rotary where the family has it, and a sliding window shorter
than the test prompts where the family has one, so that the window is really applied.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Shorter than the prompts used in tests, so the model's own window changes the result.
SLIDING_WINDOW = 6


def _config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return transformers.Qwen3Config(**_COMMON, head_dim=16)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, sliding_window=SLIDING_WINDOW)
    if family == "gemma2":
        # Eager attention: transformers drops Gemma 2's soft-cap under SDPA.
        return transformers.Gemma2Config(
            **_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **{**_COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        )
    if family == "phi3":
        return transformers.Phi3Config(**_COMMON, partial_rotary_factor=0.5)
    if family == "gpt_neox":
        cfg = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
        return transformers.GPTNeoXConfig(**cfg, rotary_pct=0.25, use_parallel_residual=True)
    raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox")
# Families whose tiny config uses eager attention (the SDPA path would change the numbers).
EAGER_FAMILIES = ("gemma2",)


def build(family: str, seed: int = 0, attn_implementation: str | None = None):
    """A tiny causal LM of ``family`` in eval mode, fp32, deterministic weights."""
    config = _config(family)
    impl = attn_implementation or ("eager" if family in EAGER_FAMILIES else "sdpa")
    config._attn_implementation = impl
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.eval()


def num_attention_layers(model) -> int:
    return model.config.num_hidden_layers
