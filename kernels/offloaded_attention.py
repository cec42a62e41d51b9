"""Attention inputs for keys and values that live in host memory (the offloaded KV cache).

``ihip.attention`` receives zero-stride proxies instead of K/V when the model runs with
``OffloadedCache`` (see ``kv_store``). This module turns a proxy back into tensors the ordinary
attention paths can read: a device scratch pair [B, H_KV, S_K, D] (one per device and dtype,
shared by all layers, grown on demand) in which exactly the keys a computation reads are filled:
    dense call                every key and value, streamed from host memory
    sparse prefill chunk      every key (stage 0 scores all of them), streamed; then the values
                              of the sinks, the selected blocks and the chunk's window only, in
                              a value scratch made after the selection (whose moved copy of
                              the keys takes its memory meanwhile)
    decode, stage 0 refresh   none on CUDA: the stage kernel reads the probed keys in pinned
                              host memory (``host_keys``); elsewhere every key, streamed
    decode, stage i > 0       none: keys of stage i - 1's kept chunks go through the pruning
                              bank and are scored in its slots (``bank_kv``); placed in the
                              scratch only when they do not all fit the bank
    decode attention          none: sinks + selected blocks + widened window go through the
                              attention bank and are attended in its slots (``bank_kv``; on
                              CUDA by a replayed graph, ``decode_step_graph``, and between
                              refreshes with no other work, ``decode_shortcut``); copied into
                              the scratch pair only when they do not all fit the bank
Other positions hold stale data from another layer; the block plan guarantees nothing reads them.
So on CUDA a decode step needs no scratch at all: the first step that attends in the bank's
slots gives the scratch a prefill left back to the allocator, and the GPU's share of the KV is
the two banks and stage 0's probe copy. A prompt's chunk reads neither: it gives them back
(``HostKVStore.release_banks``; the next decode step makes them again, empty), so while a prompt
is read the GPU's share is its scratch alone.
Selections are cached across decode steps (``decode_selection_cache``), per store and layer, so
between refreshes a decode step reads only the ~3.3k attended keys, nearly all bank hits.
"""

from __future__ import annotations

import logging

import torch

from ihip_compile.kernels import decode_shortcut
from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.block_bank import spare_for_unnamed
from ihip_compile.kernels.decode_selection_cache import cached_sparse_decode
from ihip_compile.kernels.decode_shortcut import AttentionHook, op_signature
from ihip_compile.kernels.decode_step_graph import DecodeStepGraph
from ihip_compile.kernels.kv_store import HostKVStore, store_for_layer
from ihip_compile.kernels.named_blocks import NamedBlocks, attended_blocks, kept_chunk_blocks
from ihip_compile.kernels.padding_check import hides_nothing
from ihip_compile.kernels.probe_key_copy import copy_stride
from ihip_compile.kernels.resident_blocks import record, window_first_key
from ihip_compile.kernels.sparse_attention import (
    attend_selected_blocks, sparse_attention, sparse_kwargs,
)
from ihip_compile.kernels.step_capture import hook_to_launch, observe

log = logging.getLogger(__name__)

_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(name: str, store: HostKVStore, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A [B, H_KV, S, D] device buffer, S rounded up to whole blocks by the caller; reused."""
    key = (name, store.device, store.dtype)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)
        with torch.inference_mode(False):  # reused later, maybe outside inference mode
            buf = torch.empty(int(numel * 1.25) + 1, dtype=store.dtype, device=store.device)
        _SCRATCH[key] = buf
    return buf[:numel].view(shape)


def release_scratch(name: str | None = None, store: HostKVStore | None = None) -> None:
    """Free the scratch buffers, or the one ``name`` of ``store``'s device and dtype (rebuilt
    on the next call that needs it)."""
    if name is None:
        _SCRATCH.clear()
    else:
        _SCRATCH.pop((name, store.device, store.dtype), None)


def pruning_keys(store: HostKVStore, layer: int, named: NamedBlocks, keys, stage: int):
    """Keys of the blocks ``named`` names ([B, N], distinct per row, -1: none) for pruning
    stage ``stage`` (> 0) to score, read through the layer's pruning bank: scored in the bank's
    slots (``bank_kv``) when they all fit there, else placed at their positions in the key
    scratch ``keys()`` ([B, H_KV, S, D], its last block spare) and scored there.

    Stage i > 1 scores chunks stage 1 kept, inside the blocks an earlier read of this
    selection (stage 1's, or stage i's) left in the bank: when no read of the bank and no new
    stage 0 came since (``held_pruning_reads``), they are still there, and nothing is read (a
    stage 2 refresh, every 8 steps by default, then only counts them)."""
    bank = store.pruning_bank(layer)
    if stage > 1 and store.held_pruning_reads.get(layer) == bank.admissions:
        store.count_held_named(layer, named.name, named.key, named.inputs)
        return store.pruning_bank_keys(layer)
    if store.fetch_named_bank_blocks(layer, named.name, named.key, named.inputs, named.n,
                                     "pruning"):
        store.held_pruning_reads[layer] = bank.admissions
        return store.pruning_bank_keys(layer)
    store.held_pruning_reads.pop(layer, None)
    block_ids = named.ids()
    got = store.read_bank_blocks(layer, block_ids, "pruning")
    warn_bank_overflow(store, "pruning", block_ids)
    all_keys = keys()
    place_blocks(got, block_ids, {"keys": all_keys})
    return all_keys[:, :, :store.lengths[layer]]


def attended_kv(store: HostKVStore, layer: int, selection: torch.Tensor,
                window_blocks: tuple[int, int], named: NamedBlocks, counted: int, dst):
    """A decode step's attended blocks (``named``: [B, N]) through the attention bank: returns
    the bank's slots to attend in place (``bank_kv``) once every block sits there; otherwise
    copies the blocks into the scratch pair ``dst()`` ({"keys", "values"}: [B, H_KV, S, D],
    its last block spare) and returns None. When the last step attended the same blocks
    (``resident_blocks``), nothing is read or looked up; its ``counted`` entries count as hits
    at each such step."""
    plan = store.resident_plans.get(layer)
    bank = store.attention_bank(layer)
    if plan is not None and plan.still_serves(selection, window_blocks, bank):
        bank.count_resident(plan.counted)
        return store.attention_bank_kv(layer)
    if store.fetch_named_bank_blocks(layer, named.name, named.key, named.inputs, named.n,
                                     "attention"):
        store.resident_plans[layer] = record(selection, window_blocks, counted, bank)
        # Decode reads keys and values where they lie from now on: the scratch a prefill left
        # goes back to the allocator, leaving the banks as the GPU's share of the KV.
        release_scratch("keys", store)
        release_scratch("values", store)
        return store.attention_bank_kv(layer)
    store.resident_plans.pop(layer, None)
    block_ids = named.ids()
    got = store.read_bank_blocks(layer, block_ids, "attention")
    warn_bank_overflow(store, "attention", block_ids)
    place_blocks(got, block_ids, dst())
    return None


def warn_bank_overflow(store: HostKVStore, kind: str, block_ids: torch.Tensor) -> None:
    """Say, once per store and bank, that a decode read names more blocks (``block_ids``
    [B, N]) than the ``kind`` bank holds: its blocks then go through a full-length scratch
    instead of being read in the bank's slots (the same result, for GPU memory and host reads
    the bank exists to save), and which option would hold them."""
    if kind in store.bank_overflows:
        return
    store.bank_overflows.add(kind)
    option = "gpu_cache_tokens" if kind == "attention" else "pruning_cache_tokens"
    tokens = block_ids.numel() * store.block_tokens
    log.warning("infinitehip: a decode step reads up to %d tokens through a layer's %s bank, "
                "which holds %d; such steps copy them into a full-length scratch instead of "
                "reading them in the bank (same result, more GPU memory and host reads). "
                "%s >= %d holds them.", tokens, kind,
                store.bank_slots[kind] * store.block_tokens, option, tokens)


def place_blocks(got: dict[str, torch.Tensor], block_ids: torch.Tensor,
                 dst: dict[str, torch.Tensor]) -> None:
    """Write blocks read per row ([B, N, H_KV, BK, D]) at their places ``block_ids`` [B, N] of
    ``dst`` ([B, H_KV, S, D], its last block spare: -1 lands there): one indexed copy per row,
    straight from the bank's layout."""
    bk = next(iter(got.values())).shape[3]
    n_dst_blocks = next(iter(dst.values())).shape[2] // bk
    places = spare_for_unnamed(block_ids, n_dst_blocks)
    for name, out in dst.items():
        by_block = out.view(*out.shape[:2], -1, bk, out.shape[-1])
        for row in range(block_ids.shape[0]):
            by_block[row].index_copy_(1, places[row], got[name][row].transpose(0, 1))


def offloaded_attention(q, k, v, q_positions, kv_valid, inv_freq, *, attend, **args):
    """``ihip.attention`` over an offloaded cache; ``args`` are the op's keyword scalars.

    Decode on the sparse path (``sparse_path(q, k, v, kv_valid)``):
    selection cached per store and layer, scored keys and attended blocks filled from the banks,
    split-K sparse decode. Prefill on the sparse path: every key streamed, the values of the
    attended blocks only. Everything else: ``attend`` (the op's own implementation) on K/V
    streamed from host memory. Each gives exactly the in-memory result. A decode step that
    repeats the last one (``decode_shortcut``), or that arms the shortcut for the next, reports
    its hook to a whole-step graph (``step_capture``), which may then capture and replay the
    next step.
    """
    layer = args["layer"]
    hook = hook_to_launch("attention", layer)
    if hook is not None:  # a whole decode step being captured: the launch only
        return hook.launch(q, q_positions)
    s_q, s_k = q.shape[2], k.shape[2]
    if kv_valid is not None and hides_nothing(kv_valid):
        # generate() always passes an attention mask; all-valid means no padding.
        kv_valid = None
    store = store_for_layer(layer, s_k)
    sparse_path = args["sparse_path"](q, k, v, kv_valid)
    # Decode attention as CUDA graphs (decode_step_graph, decode_shortcut)
    in_graphs = s_q == 1 and sparse_path and q.is_cuda and store.cuda_graphs
    signature = op_signature(args, inv_freq, s_k) if in_graphs else None
    if in_graphs:
        out = decode_shortcut.take(store, layer, q, q_positions, s_k, signature)
        if out is not None:
            observe(_hook(store, layer, signature, args))
            return out
    out = _ordinary_attention(store, q, k, v, q_positions, kv_valid, inv_freq, attend, args,
                              sparse_path, signature)
    # A step that armed the shortcut (a refresh, a window entering a new block) can be
    # repeated by the next one: its hook lets that step replay the whole step's graph.
    armed = store.armed_steps.get(layer) if in_graphs else None
    observe(_hook(store, layer, signature, args) if armed is not None and armed.s_k == s_k
            else None)
    return out


def _hook(store: HostKVStore, layer: int, signature: tuple, args: dict) -> AttentionHook:
    return AttentionHook(store, layer, store.step_graphs[layer], signature,
                         args.get("remap_beyond_tokens", -1))


def _ordinary_attention(store: HostKVStore, q, k, v, q_positions, kv_valid, inv_freq, attend,
                        args: dict, sparse_path: bool, signature: tuple | None):
    """``offloaded_attention`` without the shortcut: see its docstring and the module's.
    ``signature``: the op's (``op_signature``) when the decode attention runs as CUDA graphs,
    else None."""
    layer, s_q, s_k = args["layer"], q.shape[2], k.shape[2]
    bk = store.block_tokens
    padded = (-(-s_k // bk) + 1) * bk  # whole blocks and a spare one (``place_blocks``)
    b, h_kv = k.shape[:2]
    # Scratch only where keys or values are copied: decode reads them in place (module doc).
    def keys():
        return scratch("keys", store, (b, h_kv, padded, k.shape[-1]))

    def values():
        return scratch("values", store, (b, h_kv, padded, v.shape[-1]))

    if s_q > 1:
        # A prompt's chunk reads no bank: giving them back frees their memory for its scratch.
        store.release_banks()
    elif not sparse_path:
        store.resident_plans.pop(layer, None)
    if not sparse_path:
        store.selection_states.forget(layer)
        all_keys, all_values = keys(), values()
        store.stream_into(layer, {"keys": all_keys, "values": all_values})
        scalars = {n: a for n, a in args.items() if n != "sparse_path"}
        return attend(q, all_keys[:, :, :s_k], all_values[:, :, :s_k], q_positions, kv_valid,
                      inv_freq, **scalars)
    kv_for_attention = _attended_kv_filler(store, layer, q_positions, keys, values, s_k,
                                           args["sink_tokens"])
    sparse = sparse_kwargs(args, s_k, use_triton=q.is_cuda)
    if s_q > 1:
        store.selection_states.forget(layer)
        all_keys = keys()
        store.stream_into(layer, {"keys": all_keys})
        # The selection moves a full-length copy of the keys (``positioned_scoring``) before any
        # value is read: the value scratch goes back to the allocator first, so that the copy
        # takes its memory instead of adding a third full-length buffer to the GPU's share.
        release_scratch("values", store)
        return sparse_attention(q, all_keys[:, :, :s_k], v, q_positions,
                                inv_freq=inv_freq, kv_for_attention=kv_for_attention, **sparse)
    chunks = list(args["stage_chunks"])

    def keys_for_stage(start: int, candidates: torch.Tensor | None):
        if start == 0:
            # A new stage 0 makes new candidates, maybe all scored on these keys (streamed):
            # what an earlier read left in the pruning bank no longer covers them.
            store.held_pruning_reads.pop(layer, None)
            in_place = store.keys_in_place(
                layer, args["per_kv_head"],
                probe_stride=copy_stride(chunks[0], sparse["first_probes"]))
            if in_place is not None:
                return in_place
            all_keys = keys()
            # Decode attention reads its blocks through the attention bank, never these.
            store.stream_into(layer, {"keys": all_keys}, kind="pruning")
            return all_keys[:, :, :s_k]
        return pruning_keys(store, layer, kept_chunk_blocks(candidates, chunks[start - 1], bk),
                            keys, start)

    in_graph, replayed = (_graph_attender(store, layer, q, q_positions, args["block_size_q"])
                          if signature is not None else (None, {}))
    out = cached_sparse_decode(  # k, v: the proxies; keys and values come through the callbacks
        q, k, v, q_positions, inv_freq=inv_freq, layer=layer,
        refresh_intervals=args.get("refresh_intervals") or [1] * len(chunks),
        states=store.selection_states, keys_for_stage=keys_for_stage,
        kv_for_attention=lambda blocks, window: kv_for_attention(blocks, window, "attention"),
        attend=in_graph, **sparse,
    )
    if "common" in replayed:
        decode_shortcut.arm(store, layer, signature, s_k, sparse["window_tokens"],
                            replayed["common"])
    else:
        store.armed_steps.pop(layer, None)
    return out


def _graph_attender(store: HostKVStore, layer: int, q, q_positions, block_size_q: int):
    """``cached_sparse_decode``'s ``attend`` for a decode step on CUDA: in the bank's slots
    through the layer's CUDA graph (``decode_step_graph``), copies by the ordinary launch.
    Returns it and a dict that gets the step's ``common`` keywords when the graph replayed."""
    graph = store.step_graphs.setdefault(layer, DecodeStepGraph())
    replayed = {}

    def attend(q_folded, k, v, blocks, pos, common):
        if not isinstance(k, BankKV):
            return attend_selected_blocks(q_folded, k, v, blocks, pos, block_size_q, True, common)
        before = graph.replays
        out = graph.attend(q, q_positions, k, v, blocks, common)
        if graph.replays > before:
            replayed["common"] = common
        return out

    return attend, replayed


def _attended_kv_filler(store: HostKVStore, layer: int, q_positions, keys, values, s_k: int,
                        sink_tokens: int):
    """``kv_for_attention(blocks, window, through)``: the keys and values of the sinks, the
    selected blocks and the window of every query (positions in ``q_positions``), through the
    attention bank (decode: the same blocks again next step; ``attended_kv``) or straight from
    host memory into the scratch pair (``through="host"``: a prefill chunk's blocks, read once;
    its keys are already in the scratch, streamed for scoring). Returns the (keys, values) to
    attend: the bank's slots, or views of the scratch pair (``keys()``, ``values()``)."""
    bk, b = store.block_tokens, store.batch

    def fill(blocks: torch.Tensor, window: int, through: str = "host"):
        if q_positions.shape[-1] == 1:
            # A decode query is the newest key, just appended (no padding on the sparse path).
            # Knowing it spares a device sync per layer, which would stop the host from queueing
            # the next layers' work while the GPU runs this one.
            first = last = s_k - 1
        else:
            first, last = torch.stack([q_positions.min(), q_positions.max()]).tolist()  # a sync
        sink_blocks = -(-min(sink_tokens, s_k) // bk)
        win_lo = window_first_key(first, window, min(sink_tokens, s_k))
        window_blocks = (win_lo // bk, last // bk)
        named = attended_blocks(blocks, sink_blocks, window_blocks)
        if through == "attention":
            # Hits counted per step the plan serves: every entry of the lists it names.
            counted = b * (sink_blocks + blocks[0].numel() + window_blocks[1] - window_blocks[0]
                           + 1)
            in_slots = attended_kv(store, layer, blocks, window_blocks, named, counted,
                                   lambda: {"keys": keys(), "values": values()})
            if in_slots is not None:
                return in_slots
        else:
            store.copy_blocks_into(layer, named.ids(), {"values": values()})
        return keys()[:, :, :s_k], values()[:, :, :s_k]

    return fill

