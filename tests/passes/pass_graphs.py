"""Run small functions through the backend and return what the passes decided."""

from __future__ import annotations

import torch

import ihip_compile.backend as backend_module


def compile_and_run(fn, *args, options=None):
    """Compile ``fn`` with infinitehip_eager, run it, return (output, reference, last result)."""
    reference = fn(*args)
    backend = backend_module.backend(options, eager=True)
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, reference, backend_module.compiled_graphs[-1]


def qkv(batch=2, heads=4, kv_heads=2, s_q=6, s_k=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, s_q, dim, generator=g)
    k = torch.randn(batch, kv_heads, s_k, dim, generator=g)
    v = torch.randn(batch, kv_heads, s_k, dim, generator=g)
    return q, k, v


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' repeat_kv, as it appears in traced graphs."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)
