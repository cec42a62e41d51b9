"""A hand-written gpt-fast-style decoder with complex-number RoPE, for the backend's tests.

Not a transformers model: it checks that the passes read plain PyTorch attention too. Queries and
keys are rotated as interleaved pairs through ``torch.view_as_complex`` with a precomputed
``freqs_cis`` table (the hand-written Llama style), and attention is
``scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` (how the newest
transformers calls it as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyArgs:
    vocab_size: int = 96
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 128
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def precompute_freqs_cis(head_dim: int, max_seq_len: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)  # [max_seq_len, head_dim / 2] complex


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D]; consecutive channel pairs are one complex number
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * freqs_cis.view(1, x.shape[1], 1, -1)).flatten(3)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: TinyArgs):
        super().__init__()
        self.args = args
        kv_dim = args.n_kv_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, args.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        a = self.args
        b, s, _ = x.shape
        kv_dim = a.n_kv_heads * a.head_dim
        q, k, v = self.wqkv(x).split([a.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, s, a.n_heads, a.head_dim)
        k = k.view(b, s, a.n_kv_heads, a.head_dim)
        v = v.view(b, s, a.n_kv_heads, a.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).contiguous().view(b, s, a.dim))


class Block(nn.Module):
    def __init__(self, args: TinyArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim)
        self.w1 = nn.Linear(args.dim, 2 * args.dim, bias=False)
        self.w2 = nn.Linear(2 * args.dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        return x + self.w2(F.silu(self.w1(self.ffn_norm(x))))


class TinyGptFast(nn.Module):
    def __init__(self, args: TinyArgs = TinyArgs()):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_base),
            persistent=False,
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        freqs_cis = self.freqs_cis[: idx.shape[1]]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.output(self.norm(x))

    def inv_freq(self) -> torch.Tensor:
        """The frequencies the table was built from (what the rewrite must record)."""
        a = self.args
        return 1.0 / a.rope_base ** (torch.arange(0, a.head_dim, 2).float() / a.head_dim)


def build(seed: int = 0) -> TinyGptFast:
    torch.manual_seed(seed)
    return TinyGptFast().eval()
