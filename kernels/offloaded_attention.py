"""Attention inputs for keys and values that live in host memory (the offloaded KV cache).

``ihip.attention`` receives zero-stride proxies instead of K/V when the model runs with
``OffloadedCache`` (see ``kv_store``). This module turns a proxy back into tensors the ordinary
attention paths can read: a device scratch pair [B, H_KV, S_K, D] (one per device and dtype,
shared by all layers, grown on demand) in which exactly the keys a computation reads are filled:
    dense or prefill call     every key and value, streamed from host memory
    decode, stage 0 refresh   every key (scoring reads all of them), streamed
    decode, stage i > 0       keys of stage i - 1's kept chunks, through the pruning bank
    decode attention          sinks + selected blocks + (widened) window, through the attention bank
Other positions hold stale data from another layer; the block plan guarantees nothing reads them.
Selections are cached across decode steps (``decode_selection_cache``), per store and layer, so
between refreshes a decode step reads only the ~3.3k attended keys, nearly all bank hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.decode_selection_cache import cached_selection
from ihip_compile.kernels.kv_store import HostKVStore, store_for_layer

_SCRATCH: dict[tuple, torch.Tensor] = {}

# select(k, start_stage, candidates) -> (blocks [B, NQB, TOPK] int32, stages from start_stage on)
Select = Callable[[torch.Tensor, int, "torch.Tensor | None"],
                  "tuple[torch.Tensor, list[torch.Tensor]]"]


@dataclass
class OffloadedInputs:
    """What the attention paths read: K/V with the needed keys filled, and a decode plan."""

    k: torch.Tensor  # [B, H_KV, S_K, D]
    v: torch.Tensor  # [B, H_KV, S_K, D_V]
    blocks: torch.Tensor | None  # decode: cached selection [B, 1, TOPK]; None: select as usual
    window_tokens: int  # window the attention must use (widened by keys newer than stage 0)


def scratch(name: str, store: HostKVStore, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A [B, H_KV, S, D] device buffer, S rounded up to whole blocks by the caller; reused."""
    key = (name, store.device, store.dtype)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)
        buf = torch.empty(int(numel * 1.25) + 1, dtype=store.dtype, device=store.device)
        _SCRATCH[key] = buf
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free the scratch buffers (they are rebuilt on the next offloaded call)."""
    _SCRATCH.clear()


def fill_blocks(store: HostKVStore, layer: int, block_ids: torch.Tensor, kind: str,
                dst: dict[str, torch.Tensor]) -> None:
    """Copy blocks ``block_ids`` [B, N] (distinct per row, valid) through the ``kind`` bank."""
    if block_ids.shape[1] == 0:
        return
    got = store.read_blocks(layer, block_ids, kind)
    bk = store.block_tokens
    for name, out in dst.items():
        blocks = got[name].view(*got[name].shape[:2], -1, bk, got[name].shape[-1])
        by_block = out.view(*out.shape[:2], -1, bk, out.shape[-1])
        for row in range(block_ids.shape[0]):
            by_block[row].index_copy_(1, block_ids[row].long(), blocks[row])


def _distinct_blocks(parts: list[torch.Tensor]) -> torch.Tensor:
    """Union of block lists per row ([B, *] each, -1 = none) as [B, N] distinct valid ids.

    Rows get the same N by repeating their own first id (harmless: the copy is idempotent).
    """
    ids = torch.cat(parts, dim=1).long()
    rows = [torch.unique(r[r >= 0]) for r in ids]
    width = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r, r[:1].expand(width - r.numel())]) for r in rows])


def chunk_blocks(starts: torch.Tensor, chunk: int, block_tokens: int) -> torch.Tensor:
    """Blocks covering chunks that start at ``starts`` [B, NQB, N] (-1 = empty): [B, *]."""
    per_chunk = torch.arange(max(1, chunk // block_tokens), device=starts.device)
    blocks = starts.long()[..., None] // block_tokens + per_chunk
    blocks = torch.where(starts[..., None] < 0, -1, blocks)
    return blocks.flatten(1)


def offloaded_inputs(
    q: torch.Tensor,  # [B, H, S_Q, D]
    k_proxy: torch.Tensor,  # [B, H_KV, S_K, D], zero strides
    v_proxy: torch.Tensor,
    q_positions: torch.Tensor,
    *,
    layer: int,
    sparse: bool,
    sink_tokens: int,
    window_tokens: int,
    stage_chunks: list[int],
    refresh_intervals: list[int],
    select: Select | None,
) -> OffloadedInputs:
    """Resolve proxies for one attention call; ``sparse``: the caller takes the sparse path."""
    s_q, s_k = q.shape[-2], k_proxy.shape[-2]
    store = store_for_layer(layer, s_k)
    bk = store.block_tokens
    padded = -(-s_k // bk) * bk
    b, h_kv = k_proxy.shape[:2]
    k = scratch("keys", store, (b, h_kv, padded, k_proxy.shape[-1]))
    v = scratch("values", store, (b, h_kv, padded, v_proxy.shape[-1]))
    if not sparse or s_q > 1 or select is None or not refresh_intervals:
        store.selection_states.forget(layer)
        store.stream_into(layer, {"keys": k, "values": v})
        return OffloadedInputs(k[:, :, :s_k], v[:, :, :s_k], None, window_tokens)

    def run_stages(start: int, candidates: torch.Tensor | None):
        if start == 0:
            store.stream_into(layer, {"keys": k})
        else:
            needed = _distinct_blocks([chunk_blocks(candidates, stage_chunks[start - 1], bk)])
            fill_blocks(store, layer, needed, "pruning", {"keys": k})
        return select(k[:, :, :s_k], start, candidates)

    blocks, extra = cached_selection(store.selection_states, layer, s_k, b,
                                     tuple(refresh_intervals), run_stages)
    window = window_tokens + extra
    last = int(q_positions.max())
    device = q.device
    sinks = torch.arange(-(-min(sink_tokens, s_k) // bk), device=device)
    win_lo = max(min(sink_tokens, s_k), last - window + 1)
    recent = torch.arange(win_lo // bk, last // bk + 1, device=device)
    needed = _distinct_blocks([
        sinks.expand(b, -1), blocks.flatten(1).long(), recent.expand(b, -1),
    ])
    fill_blocks(store, layer, needed, "attention", {"keys": k, "values": v})
    return OffloadedInputs(k[:, :, :s_k], v[:, :, :s_k], blocks, window)


def offloaded_attention(q, k, v, q_positions, kv_valid, inv_freq, *, attend, **args):
    """``ihip.attention`` over an offloaded cache; ``args`` are the op's keyword scalars.

    Decode at S_K >= dense_below_tokens (no padding mask, no model window): cached selection and
    split-K sparse decode over the banked blocks. Everything else: ``attend`` (the op's own
    implementation) on K/V streamed from host memory, so it gives exactly the in-memory result.
    """
    s_q, s_k = q.shape[2], k.shape[2]
    chunks = list(args["stage_chunks"])
    refresh = list(args.get("refresh_intervals") or [1] * len(chunks))
    sparse = (s_q == 1 and s_k >= args["dense_below_tokens"] and kv_valid is None
              and args.get("model_window", 0) <= 0)

    def select(keys, start, candidates):
        return select_blocks(
            q, keys, q_positions, block_size_q=args["block_size_q"],
            sink_tokens=args["sink_tokens"], window_tokens=args["window_tokens"],
            selected_tokens=args["selected_tokens"], stage_chunks=chunks,
            stage_keeps=list(args["stage_keeps"]), rope_mode=args.get("pruning_rope", 0),
            inv_freq=inv_freq, rotary_dim=args.get("rotary_dim", 0),
            rope_layout=args.get("rope_layout", 0), start_stage=start, candidates=candidates,
            return_stages=True,
        )

    got = offloaded_inputs(
        q, k, v, q_positions, layer=args["layer"], sparse=sparse,
        sink_tokens=args["sink_tokens"], window_tokens=args["window_tokens"],
        stage_chunks=chunks, refresh_intervals=refresh, select=select,
    )
    if got.blocks is None:
        return attend(q, got.k, got.v, q_positions, kv_valid, inv_freq, **args)
    remap_beyond = args.get("remap_beyond_tokens", -1)
    if q.is_cuda:
        from ihip_compile.kernels.sparse_decode import sparse_decode as decode
    else:
        from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref as decode
    positions = q_positions.reshape(-1, 1)[-1:].expand(q.shape[0], 1) \
        if q_positions.dim() == 1 else q_positions
    return decode(
        q, got.k, got.v, got.blocks, positions, scale=args["scale"],
        sink_tokens=args["sink_tokens"], window_tokens=got.window_tokens,
        block_size_k=chunks[-1], softcap=args.get("softcap", 0.0),
        remap=remap_beyond >= 0 and s_k > remap_beyond, inv_freq=inv_freq,
        rotary_dim=args.get("rotary_dim", 0), rope_layout=args.get("rope_layout", 0),
    )
