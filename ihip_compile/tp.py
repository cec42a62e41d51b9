"""What our code must know about a model under PyTorch's own tensor parallelism.

Sharding is transformers' (``DistributedConfig(tp_size=N)`` under ``torchrun``) or DTensor's,
never ours: the q/k/v projections are split by columns, so each rank holds whole heads, and
``torch.ops.ihip.attention`` runs on those local heads exactly as it would on one GPU. Only
things sized per rank need the local counts, and only models whose heads do not divide among the
ranks need another plan:

    from transformers.distributed import DistributedConfig
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(
        tp_size=2, tp_plan=tp_plan_for(config, 2)))          # "auto", or attention replicated
    model.compile(backend="infinitehip")
    cache = OffloadedCache(model.config, kv_heads=local_kv_heads(model), max_cache_tokens=...)
"""

from __future__ import annotations

from typing import Any


def tensor_parallel_size(model) -> int:
    """Ranks the model's tensor-parallel plan spans (1 when it was loaded without one)."""
    size = getattr(model, "tp_size", None)
    return int(size) if size else 1


def heads_divide(config, tp_size: int) -> bool:
    """True when both query and KV heads split evenly into ``tp_size`` ranks."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads % tp_size == 0 and kv_heads % tp_size == 0


def local_kv_heads(model) -> int:
    """KV heads of one rank: what a per-rank cache (``OffloadedCache(kv_heads=...)``) holds."""
    config = model.config
    tp_size = tensor_parallel_size(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if tp_size == 1 or not _attention_is_sharded(model):
        return kv_heads
    if not heads_divide(config, tp_size):
        raise ValueError(
            f"{config.num_attention_heads} query / {kv_heads} KV heads do not split into "
            f"{tp_size} ranks; load the model with tp_plan_for(config, {tp_size})"
        )
    return kv_heads // tp_size


def tp_plan_for(config, tp_size: int) -> str | dict[str, str]:
    """The tensor-parallel plan to load ``config``'s model with on ``tp_size`` ranks.

    ``"auto"`` (the model's own plan, heads sharded) when the heads divide; otherwise the model's
    plan without its attention entries: attention is replicated on every rank (our op then sees
    all heads, as on one GPU) and only the MLP and the output head are sharded. Example:
    SmolLM2-135M, 9 query / 3 KV heads, on 2 ranks.
    """
    if heads_divide(config, tp_size):
        return "auto"
    plan = {key: style for key, style in _full_plan(config).items() if not is_attention_key(key)}
    if not plan:
        raise ValueError(f"{type(config).__name__} has no tensor-parallel plan beyond attention")
    return plan


def is_attention_key(name: str) -> bool:
    """Whether a parameter or plan key belongs to an attention block.

    Names seen: ``model.layers.*.self_attn.q_proj`` (Llama, Qwen, Mistral, Gemma, Phi-3),
    ``gpt_neox.layers.*.attention.query_key_value`` (GPT-NeoX), ``transformer.h.*.attn.*`` (GPT-J).
    """
    return any(part in ("attention", "self_attention") or "attn" in part
               for part in name.split("."))


def _attention_is_sharded(model) -> bool:
    """True when some attention weight is a DTensor split across the ranks."""
    from torch.distributed.tensor import DTensor, Shard

    return any(
        is_attention_key(name) and isinstance(param, DTensor)
        and any(isinstance(p, Shard) for p in param.placements)
        for name, param in model.named_parameters()
    )


def _full_plan(config) -> dict[str, Any]:
    """The model class's whole plan (its own entries and its base model's), built on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = dict(model.tp_plan or {})
    if not plan:
        raise ValueError(f"{type(config).__name__} defines no tensor-parallel plan")
    return plan
