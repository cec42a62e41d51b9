"""Keys and values in host memory, owned by the op layer, and the op that appends to them.

Why the op layer owns them: a compiled graph cannot own tensors that live in host memory and grow
every step. So the offloaded cache (``ihip_compile.offload.OffloadedCache``) keeps only a store id;
its ``update()`` calls ``torch.ops.ihip.kv_store_append(key, value, store_id, layer)``, which
copies the new tokens into the store and returns a one-element NaN marker on the model's device. The cache
hands attention ``marker.expand(B, H_KV, S_K, D)``: a tensor of the right shape and no memory
(all strides 0), which depends on the append, so no scheduler can run attention before it. The
attention op recognises such a proxy (``is_offload_proxy``) and reads the real keys from the store
that last appended to its layer. A proxy that reaches any other attention sees NaN, never a silent
wrong number.

Layout per layer: block-major host copies [B * N_BLOCKS, H_KV, BLOCK_K, D] (pinned in place and
registered with CUDA when the model runs on CUDA: GPU kernels read blocks and probed keys from
them directly, and a streamed piece crosses PCIe as one DMA), and two GPU banks
(``block_bank.BlockBank``): one of keys for pruning, one of keys and values for attention.
Storage may be float8_e4m3fn (half the bytes; values beyond +-448 saturate). With
``pruning_key_dtype=float8_e4m3fn`` over 16-bit storage, each layer also keeps its keys in FP8
(``pruning_keys``), and the pruning stages read those: stage 0's probes in host memory and the
pruning bank. A decode refresh is bound by those reads over PCIe (reports/bench/fp8_pruning_keys/),
and they are then half the bytes; the attention still reads the keys and values as stored.
"""

from __future__ import annotations

import gc
import itertools
import os
import weakref

import torch

from ihip_compile.kernels.append_step_graph import AppendHook, AppendStepGraph
from ihip_compile.kernels.decode_shortcut import ArmedStep
from ihip_compile.kernels.decode_step_graph import DecodeStepGraph
from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.block_bank import (
    BlockBank, host_blocks_into, row_block_ids, spare_for_unnamed,
)
from ihip_compile.kernels.block_cache_ref import as_bits
from ihip_compile.kernels.decode_selection_cache import SelectionStates
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.probe_key_copy import ProbeKeyCopy
from ihip_compile.kernels.resident_blocks import ResidentBlocks
from ihip_compile.kernels.step_capture import hook_to_launch, observe
from ihip_compile.kernels.token_append import append_tokens

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Stream host memory in pieces of this many blocks, bounding the staging copy on the device.
_STREAM_BLOCKS = 8192


def available_host_bytes() -> int:
    """Host memory the kernel reports as available to new allocations (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class HostKVStore:
    """All layers' K/V of one cache in host memory, with per-layer GPU block banks."""

    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 value_dim: int, capacity_tokens: int, block_tokens: int, dtype: torch.dtype,
                 device: torch.device | str | None = None,
                 storage_dtype: torch.dtype | None = None,
                 pruning_key_dtype: torch.dtype | None = None,
                 attention_bank_tokens: int, pruning_bank_tokens: int, cuda_graphs: bool = True):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("value_dim", value_dim),
                            ("capacity_tokens", capacity_tokens), ("block_tokens", block_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers, self.batch, self.kv_heads = num_layers, batch, kv_heads
        self.head_dim, self.value_dim, self.block_tokens = head_dim, value_dim, block_tokens
        self.blocks_per_row = -(-capacity_tokens // block_tokens)
        self.capacity_tokens = self.blocks_per_row * block_tokens
        # The device of the banks: given, or that of the first keys appended.
        self.dtype, self.device = dtype, None if device is None else torch.device(device)
        self.storage_dtype = storage_dtype or dtype
        # The keys the pruning stages read: the stored ones, or a second copy in this dtype.
        self.pruning_key_dtype = pruning_key_dtype or self.storage_dtype
        if self.pruning_key_dtype not in (self.storage_dtype, torch.float8_e4m3fn):
            raise ValueError(f"pruning_key_dtype must be None, the storage dtype "
                             f"({self.storage_dtype}) or torch.float8_e4m3fn, got "
                             f"{pruning_key_dtype}")
        # Replay each layer's decode append and attention, and the banks' reads, as CUDA
        # graphs on CUDA (append_step_graph, decode_step_graph, decode_shortcut,
        # replayed_work); off: ordinary launches.
        self.cuda_graphs = cuda_graphs
        self._admission_pool = None  # one memory pool for every bank's read graphs
        self.bank_slots = {"attention": max(1, attention_bank_tokens // block_tokens),
                           "pruning": max(1, pruning_bank_tokens // block_tokens)}
        self._check_host_memory(self.host_bytes, "lower max_cache_tokens, use "
                                "storage_dtype=float8_e4m3fn, or free host memory")
        self.lengths = [0] * num_layers
        self._pinned: list[int] = []  # host pointers registered with CUDA
        self._host: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        # Made at a layer's first decode read, given back while a prefill chunk runs
        # (``release_banks``); their hits and misses outlive them here.
        self._banks: list[dict[str, BlockBank] | None] = [None] * num_layers
        self._released_counts = [{f"{kind}_{count}": 0 for kind in self.bank_slots
                                  for count in ("hits", "misses")} for _ in range(num_layers)]
        self.streamed_blocks = [0] * num_layers
        self.in_place_scans = [0] * num_layers  # scoring runs that read host keys in place
        self.selection_states = SelectionStates()  # decode mask caching of this sequence batch
        self.resident_plans: dict[int, ResidentBlocks] = {}  # layer -> last attended blocks
        self.step_graphs: dict[int, DecodeStepGraph] = {}  # layer -> its decode attention graph
        self.armed_steps: dict[int, ArmedStep] = {}  # layer -> the step decode_shortcut continues
        self.append_graphs: dict[int, AppendStepGraph] = {}  # layer -> its decode append graph
        self.probe_copies: dict[int, ProbeKeyCopy] = {}  # layer -> stage 0's first probes
        # layer -> the pruning bank's read count after a read that left every block it named
        # there (``offloaded_attention.pruning_keys``)
        self.held_pruning_reads: dict[int, int] = {}
        self.bank_overflows: set[str] = set()  # banks a decode read did not fit (warned once)

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Host bytes of all layers' K/V at full capacity (what the store may allocate)."""
        shapes, dtypes = self._block_shapes(), self._host_dtypes()
        per_token = sum(heads * dim * _item_size(dtypes[name])
                        for name, (heads, _, dim) in shapes.items())
        return self.num_layers * self.batch * self.capacity_tokens * per_token

    @property
    def gpu_bytes(self) -> int:
        """Device bytes the banks and probe copies of the layers allocated so far take."""
        return (sum(b.nbytes for banks in self._banks if banks for b in banks.values())
                + sum(copy.nbytes for copy in self.probe_copies.values()))

    def _check_host_memory(self, needed: int, advice: str) -> None:
        available = available_host_bytes()
        if needed > available:
            # A dropped cache that a reference cycle still holds frees its host memory only when
            # Python's cycle collector runs. The cache a model was compiled with is such a one:
            # the compiler's trace records refer to it. Collect before refusing.
            gc.collect()
            available = available_host_bytes()
        if needed > available:
            raise ValueError(
                f"the offloaded KV cache needs {needed:,} bytes of host memory "
                f"({needed / 2**30:.1f} GiB for {self.num_layers} layers x "
                f"{self.capacity_tokens:,} tokens x batch {self.batch}) but only {available:,} "
                f"bytes ({available / 2**30:.1f} GiB) are available: {advice}"
            )

    def grow(self, capacity_tokens: int) -> None:
        """Raise the capacity to at least ``capacity_tokens``, keeping every token.

        The new size (allocated before the old one is freed) is checked against available host
        memory first. Bank contents are dropped (block ids change with the row length).
        """
        blocks = -(-capacity_tokens // self.block_tokens)
        if blocks <= self.blocks_per_row:
            return
        old_blocks, old_host = self.blocks_per_row, self._host
        self.blocks_per_row, self.capacity_tokens = blocks, blocks * self.block_tokens
        try:
            self._check_host_memory(self.host_bytes, "the prompt is too long for this machine")
        except ValueError:
            self.blocks_per_row, self.capacity_tokens = old_blocks, old_blocks * self.block_tokens
            raise
        self._host = [None] * self.num_layers
        self.release_banks()
        self._wait_for_device()  # appends write host memory from the device
        for layer, host in enumerate(old_host):
            if host is None:
                continue
            new = self._layer_host(layer)
            for name, old in host.items():
                shape = (self.batch, -1, *old.shape[1:])
                as_bits(new[name]).view(shape)[:, :old_blocks] = as_bits(old).view(shape)
            self._unpin(host.values())

    # --- writing -------------------------------------------------------------------------------
    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copy new tokens ``key`` [B, H_KV, S, D], ``value`` [B, H_KV, S, D_V] after the rest."""
        self._check_layer(layer)
        batch, heads, s_new, _ = key.shape
        if (batch, heads) != (self.batch, self.kv_heads) or key.shape[-1] != self.head_dim:
            advice = (f"make the cache with batch_size={batch}" if batch != self.batch else
                      "make the cache from this model's config")
            raise ValueError(
                f"layer {layer}: keys of shape {tuple(key.shape)} do not fit a store of batch "
                f"{self.batch}, {self.kv_heads} KV heads, head dim {self.head_dim}: {advice}"
            )
        start, end = self.lengths[layer], self.lengths[layer] + s_new
        if end > self.capacity_tokens:
            raise ValueError(
                f"layer {layer}: {end:,} tokens exceed the cache's max_cache_tokens "
                f"({self.capacity_tokens:,}); create the cache with a larger max_cache_tokens"
            )
        if key.dtype != self.dtype:
            raise ValueError(f"layer {layer}: keys of dtype {key.dtype}, store of {self.dtype}")
        self.device = self.device or key.device
        self._layer_host(layer)  # allocated on first use
        if s_new == 1 and key.is_cuda and self.cuda_graphs:  # a decode step: captured append
            graph = self.append_graphs.setdefault(layer, AppendStepGraph())
            graph.append(key, value, start, lambda k, v: self.token_writes(layer, k, v),
                         self.blocks_per_row, self.append_layout(layer))
        else:
            append_tokens(self.token_writes(layer, key, value), start, self.blocks_per_row)
        self.lengths[layer] = end

    def append_layout(self, layer: int) -> tuple:
        """The objects holding the memory an append to ``layer`` writes (host copy, banks): a
        captured append is valid while they stay the same objects."""
        return (self._host[layer], self._banks[layer])

    def count_decode_append(self, layer: int) -> None:
        """Record a one-token append to ``layer`` that a replayed graph wrote."""
        self.lengths[layer] += 1
        mark_appended(layer, self)

    def token_writes(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> list:
        """``token_append``'s writes of new tokens to a layer's host copies and banks."""
        host, banks = self._host[layer], self._banks[layer] or {}
        dtypes, news = self._host_dtypes(), {"keys": key, "values": value, "pruning_keys": key}
        copies = self._bank_copies()
        return [(_converted(news[name], dtypes[name]), host[name],
                 [(banks[kind].slot_of_block, banks[kind].tensors[tensor])
                  for kind, tensor in copies[name] if kind in banks])
                for name in host]

    def _bank_copies(self) -> dict[str, list[tuple[str, str]]]:
        """Host copy name -> the (bank kind, bank tensor name) pairs that hold its blocks."""
        pruned = "pruning_keys" if self._separate_pruning_keys else "keys"
        copies = {"keys": [("attention", "keys")], "values": [("attention", "values")],
                  "pruning_keys": []}
        copies[pruned].append(("pruning", "keys"))
        return copies

    def reset_layer(self, layer: int) -> None:
        """Forget one layer's tokens (its next append starts a new sequence)."""
        self.lengths[layer] = 0
        self.selection_states.forget(layer)
        self.resident_plans.pop(layer, None)
        self.probe_copies.pop(layer, None)
        for bank in (self._banks[layer] or {}).values():
            bank.clear()

    def reset(self) -> None:
        """Forget every token (a new sequence); host memory stays allocated for reuse."""
        self.lengths = [0] * self.num_layers
        self.selection_states = SelectionStates()
        self.resident_plans.clear()
        self.probe_copies.clear()
        for banks in self._banks:
            for bank in (banks or {}).values():
                bank.clear()

    def release_banks(self) -> None:
        """Give every layer's banks and probe copies back to the allocator, with what reads them in
        place (decode graphs, resident plans); the next decode read makes them again, empty.

        A prefill chunk calls it: it reads none of them, and its full-length scratch then has
        their memory instead of adding to it, so the GPU's share of the KV while a prompt is
        read is that scratch alone. Every token stays in host memory; hits and misses so far
        stay counted (``hit_counts``)."""
        if not any(self._banks) and not self.probe_copies:
            return
        for layer, banks in enumerate(self._banks):
            for kind, bank in (banks or {}).items():
                self._released_counts[layer][f"{kind}_hits"] += bank.hits
                self._released_counts[layer][f"{kind}_misses"] += bank.misses
        self._banks = [None] * self.num_layers
        # Their memory goes back to torch's caching allocator, which gives it to the device
        # itself before an allocation would run out (no emptying of the cache here: that would
        # make every later allocation of this prompt a new device allocation).
        for holders in (self.probe_copies, self.step_graphs, self.armed_steps,
                        self.append_graphs, self.resident_plans, self.held_pruning_reads):
            holders.clear()

    def allocate(self) -> None:
        """Allocate (and on CUDA pin) every layer's host memory now, not at each layer's first
        token: a server that makes its cache once and ``reset()``s it between prompts then pays
        for it before its first prompt instead of during it."""
        if self.device is None:
            raise ValueError("allocate() needs the store's device: pass device= when making it")
        for layer in range(self.num_layers):
            self._layer_host(layer)

    # --- reading -------------------------------------------------------------------------------
    def read_tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key and value of a layer, [B, H_KV, S_K, D] on the device, from host memory."""
        self._check_layer(layer)
        padded = -(-self.lengths[layer] // self.block_tokens) * self.block_tokens
        out = {name: torch.empty((self.batch, self.kv_heads, padded, dim), dtype=self.dtype,
                                 device=self.device)
               for name, dim in (("keys", self.head_dim), ("values", self.value_dim))}
        self.stream_into(layer, out)
        length = self.lengths[layer]
        return out["keys"][:, :, :length], out["values"][:, :, :length]

    def stream_into(self, layer: int, dst: dict[str, torch.Tensor],
                    kind: str = "attention") -> None:
        """Copy every block of a layer from host memory into ``dst`` ({"keys"/"values":
        [B, H_KV, >= S_K rounded up to blocks, D]}), past the banks, a piece at a time: the
        copies the ``kind`` bank reads (``"pruning"``: the keys the pruning stages score)."""
        host = self._kind_host(layer, kind)
        n_blocks = -(-self.lengths[layer] // self.block_tokens)
        self.streamed_blocks[layer] += n_blocks * self.batch * len(dst)
        bk = self.block_tokens
        for name, out in dst.items():
            by_row = host[name].view(self.batch, self.blocks_per_row, self.kv_heads, bk, -1)
            for lo in range(0, n_blocks, _STREAM_BLOCKS):
                hi = min(n_blocks, lo + _STREAM_BLOCKS)
                piece = as_bits(by_row[:, lo:hi])
                piece = piece.to(out.device, non_blocking=piece.is_pinned())
                piece = piece.view(host[name].dtype).to(out.dtype)
                out[:, :, lo * bk: hi * bk] = piece.permute(0, 2, 1, 3, 4).flatten(2, 3)

    def keys_in_place(self, layer: int, per_kv_head: bool,
                      probe_stride: int = 0) -> BlockMajorKeys | None:
        """The layer's keys for the stage kernel to read where they lie (``host_keys``; FP8
        storage widened as read), or None where it cannot: not on CUDA, or one selection per KV
        head for several rows (not one stride apart). The caller then streams them. With
        ``probe_stride``, the keys a stage with first-step parts of that many keys probes first
        are also kept on the device (``probe_key_copy``) and come along."""
        host = self._kind_host(layer, "pruning")["keys"]
        if (self.device.type != "cuda" or (per_kv_head and self.batch > 1)
                or host.data_ptr() not in self._pinned):
            return None
        self.in_place_scans[layer] += 1
        length, copy = self.lengths[layer], None
        if probe_stride > 0:
            probes = self.probe_copies.get(layer)
            if probes is None or probes.stride != probe_stride:
                probes = self.probe_copies[layer] = ProbeKeyCopy(probe_stride)
            copy = probes.update(host, self.batch, length, self.capacity_tokens, self.device)
        return BlockMajorKeys(host, self.batch, length, self.device, 1, self.dtype, copy,
                              probe_stride)

    def copy_blocks_into(self, layer: int, block_ids: torch.Tensor,
                         dst: dict[str, torch.Tensor]) -> None:
        """Copy blocks ``block_ids`` [B, N] (-1: no block) from host memory to their places in
        ``dst`` (as ``stream_into``, past the banks, plus a spare last block where -1 lands): the
        blocks one computation reads, not all. Counting them is a host sync (a prefill's)."""
        host = self._layer_host(layer)
        self.streamed_blocks[layer] += int((block_ids >= 0).sum()) * len(dst)
        bk = self.block_tokens
        out = next(iter(dst.values()))
        block_ids = block_ids.to(out.device)
        places = spare_for_unnamed(block_ids, out.shape[2] // bk)
        for name, out in dst.items():
            by_row = host[name].view(self.batch, self.blocks_per_row, self.kv_heads, bk, -1)
            by_block = out.view(*out.shape[:2], -1, bk, out.shape[-1])
            for row, ids in enumerate(block_ids):
                host_blocks_into(by_row[row], ids, by_block[row].transpose(0, 1), places[row])

    def read_blocks(self, layer: int, block_ids: torch.Tensor,
                    kind: str = "attention") -> dict[str, torch.Tensor]:
        """Blocks ``block_ids`` [B, N] through the layer's ``kind`` bank; -1 names no block
        (zeros).

        Returns {"keys": [B, H_KV, N * BLOCK_K, D]} (and "values" for the attention bank) in the
        model dtype. Tokens of a block past the layer's length are whatever was last written there.
        """
        blocks = self.read_bank_blocks(layer, block_ids, kind)
        return {name: t.transpose(1, 2).flatten(2, 3) for name, t in blocks.items()}

    def read_bank_blocks(self, layer: int, block_ids: torch.Tensor,
                         kind: str = "attention") -> dict[str, torch.Tensor]:
        """``read_blocks`` as the bank returns them: [B, N, H_KV, BLOCK_K, D] (a view, no copy)."""
        bank, ids = self._bank_and_ids(layer, block_ids, kind)
        return self._by_row(bank.read(ids, self._kind_host(layer, kind), self.dtype))

    def fetch_named_bank_blocks(self, layer: int, name, key, inputs: tuple, n: int,
                                kind: str = "attention") -> bool:
        """The blocks ``name(*inputs)`` names ([B, N] per row, -1: none, ``n`` = B * N; device
        ops only) made resident in the layer's ``kind`` bank, to be read in its slots
        (``pruning_bank_keys``, ``attention_bank_kv``): only the misses are copied, and on CUDA
        one replayed graph per ``key`` names, admits and copies them (``BlockBank.fetch_named``).
        False, with nothing done, when they may not all fit the bank: ``read_bank_blocks``
        then."""
        bank = self._kind_bank(layer, kind)
        return bank.fetch_named(self._bank_ids_of(name), (kind, key), inputs, n,
                                self._kind_host(layer, kind))

    def count_held_named(self, layer: int, name, key, inputs: tuple) -> None:
        """Count the pruning bank's blocks ``name(*inputs)`` names ([B, N], as
        ``fetch_named_bank_blocks``) as held hits (``BlockBank.count_held_named``)."""
        bank = self._kind_bank(layer, "pruning")
        bank.count_held_named(self._bank_ids_of(name), key, inputs)

    def _bank_ids_of(self, name):
        """``name`` (inputs -> [B, N] blocks per row) as the bank's ids [B * N]."""
        return lambda *inputs: row_block_ids(name(*inputs), self.blocks_per_row).reshape(-1)

    def _bank_and_ids(self, layer: int, block_ids: torch.Tensor, kind: str):
        """The layer's ``kind`` bank and ``block_ids`` [B, N] as its ids [B * N]."""
        bank = self._kind_bank(layer, kind)
        return bank, row_block_ids(block_ids, self.blocks_per_row).reshape(-1)

    def _kind_bank(self, layer: int, kind: str):
        self._check_layer(layer)
        if kind not in self.bank_slots:
            raise ValueError(f"kind must be one of {sorted(self.bank_slots)}, got {kind!r}")
        return self._layer_banks(layer)[kind]

    def attention_bank(self, layer: int):
        """The layer's attention bank (made on first use)."""
        return self._layer_banks(layer)["attention"]

    def pruning_bank(self, layer: int):
        """The layer's pruning bank (made on first use)."""
        return self._layer_banks(layer)["pruning"]

    def pruning_bank_keys(self, layer: int) -> BankKV:
        """The layer's pruning bank as keys the stage kernels score in its slots (``bank_kv``),
        over the layer's tokens; FP8 storage is widened to the model dtype as read."""
        bank = self.pruning_bank(layer)
        return BankKV(bank.tensors["keys"], bank.slot_of_block, self.batch, self.blocks_per_row,
                      self.lengths[layer], compute_dtype=self.dtype)

    def attention_bank_kv(self, layer: int) -> tuple[BankKV, BankKV]:
        """The layer's attention bank as the keys and values a decode kernel reads in its slots
        (``bank_kv``), over the layer's tokens; FP8 storage is widened as the kernel reads it."""
        bank = self.attention_bank(layer)
        return tuple(BankKV(bank.tensors[name], bank.slot_of_block, self.batch,
                            self.blocks_per_row, self.lengths[layer])
                     for name in ("keys", "values"))

    def _by_row(self, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[B * N, H_KV, BLOCK_K, D] blocks -> [B, N, H_KV, BLOCK_K, D] (a view)."""
        return {name: t.view(self.batch, -1, *t.shape[1:]) for name, t in blocks.items()}

    def hit_counts(self) -> list[dict[str, int]]:
        """Per layer: hits and misses of each bank, blocks streamed past the banks (a K block
        and a V block count as two), and scoring runs that read the host keys in place."""
        out = []
        for layer, banks in enumerate(self._banks):
            row = {"layer": layer, "streamed_blocks": self.streamed_blocks[layer],
                   "in_place_scans": self.in_place_scans[layer]}
            row.update(self._released_counts[layer])
            for bank_name, bank in (banks or {}).items():
                row[f"{bank_name}_hits"] += bank.hits
                row[f"{bank_name}_misses"] += bank.misses
            out.append(row)
        return out

    # --- internals -----------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    @property
    def _separate_pruning_keys(self) -> bool:
        return self.pruning_key_dtype != self.storage_dtype

    def _kind_host(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        """The host copies the layer's ``kind`` bank reads, by the bank's tensor names."""
        host = self._layer_host(layer)
        if kind == "pruning":
            return {"keys": host["pruning_keys" if self._separate_pruning_keys else "keys"]}
        return {name: host[name] for name in ("keys", "values")}

    def _layer_host(self, layer: int) -> dict[str, torch.Tensor]:
        """Allocate a layer's host copies on first use."""
        if self._host[layer] is None:
            with torch.inference_mode(False):  # written in place later, maybe outside it
                self._allocate_host(layer)
        return self._host[layer]

    def _layer_banks(self, layer: int) -> dict[str, BlockBank]:
        """Make a layer's banks (empty) on first use, or first use since ``release_banks``."""
        self._layer_host(layer)
        if self._banks[layer] is None:
            with torch.inference_mode(False):  # written in place later, maybe outside it
                self._banks[layer] = self._new_banks()
        return self._banks[layer]

    def _host_zeros(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """Zeroed host memory, pinned in place (cudaHostRegister) when the model runs on CUDA.

        In place rather than ``pin_memory=True``: the caching pinned allocator rounds a request up
        to a power of two, which would nearly double a 2.1 GiB layer and void the memory check.
        """
        t = torch.zeros(shape, dtype=dtype)
        if pin:
            ptr, size = t.data_ptr(), t.numel() * t.element_size()
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
            if err != 0:
                raise RuntimeError(f"pinning {size:,} host bytes failed (cudaError {err})")
            self._pinned.append(ptr)
        return t

    def _unpin(self, tensors) -> None:
        tensors = [t for t in tensors if t.data_ptr() in self._pinned]
        if tensors:
            # Kernels read and write this memory in place: none may still run when it goes.
            self._wait_for_device()
        for t in tensors:
            if t.data_ptr() in self._pinned:
                self._pinned.remove(t.data_ptr())
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def _wait_for_device(self) -> None:
        """Let device work on this store's host memory finish before the host touches it."""
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)

    def __del__(self) -> None:
        # Unregister before the memory goes back to the system (the tensors are still alive here).
        for host in getattr(self, "_host", None) or []:
            if host is not None and getattr(self, "_pinned", None):
                self._unpin(host.values())

    def _block_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The block shape of each host copy of a layer."""
        shapes = {"keys": (self.kv_heads, self.block_tokens, self.head_dim),
                  "values": (self.kv_heads, self.block_tokens, self.value_dim)}
        if self._separate_pruning_keys:
            shapes["pruning_keys"] = shapes["keys"]
        return shapes

    def _host_dtypes(self) -> dict[str, torch.dtype]:
        return {"keys": self.storage_dtype, "values": self.storage_dtype,
                "pruning_keys": self.pruning_key_dtype}

    def _allocate_host(self, layer: int) -> None:
        pin = self.device.type == "cuda"
        rows, dtypes = self.batch * self.blocks_per_row, self._host_dtypes()
        self._host[layer] = {name: self._host_zeros((rows, *shape), dtypes[name], pin)
                             for name, shape in self._block_shapes().items()}

    def _new_banks(self) -> dict[str, BlockBank]:
        rows, shapes = self.batch * self.blocks_per_row, self._block_shapes()
        pool = self._bank_graph_pool()
        return {
            "attention": BlockBank(n_slots=self.bank_slots["attention"], n_blocks=rows,
                                   block_shapes={n: shapes[n] for n in ("keys", "values")},
                                   dtype=self.storage_dtype, device=self.device,
                                   graph_pool=pool),
            "pruning": BlockBank(n_slots=self.bank_slots["pruning"], n_blocks=rows,
                                 block_shapes={"keys": shapes["keys"]},
                                 dtype=self.pruning_key_dtype, device=self.device,
                                 graph_pool=pool),
        }

    def _bank_graph_pool(self):
        """The memory pool of the banks' read graphs; None without CUDA graphs."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return None
        if self._admission_pool is None:
            self._admission_pool = torch.cuda.graph_pool_handle()
        return self._admission_pool


def _item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _converted(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; float8_e4m3fn saturates at +-448 instead of becoming NaN."""
    if dtype == torch.float8_e4m3fn and t.dtype != dtype:
        t = t.clamp(-FP8_MAX, FP8_MAX)
    return t.to(dtype)


# --- the op layer's registry ---------------------------------------------------------------------
_STORES: weakref.WeakValueDictionary[int, HostKVStore] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)
# Store that last appended to each layer: the attention that follows reads from it. Weak: a
# deleted cache's host memory is freed at once.
_LAST_APPENDED: dict[int, weakref.ref] = {}


def register_store(store: HostKVStore) -> torch.Tensor:
    """Register ``store``; returns the id tensor the cache passes to ``ihip.kv_store_append``."""
    store_id = next(_NEXT_ID)
    _STORES[store_id] = store
    return torch.tensor([store_id], dtype=torch.int64)


def mark_appended(layer: int, store: HostKVStore) -> None:
    """Record that ``store`` holds ``layer``'s newest tokens: its attention reads from there."""
    _LAST_APPENDED[layer] = weakref.ref(store)


def is_offload_proxy(t: torch.Tensor) -> bool:
    """True for the zero-stride stand-ins the offloaded cache returns instead of keys/values."""
    return t.dim() == 4 and t.numel() > 1 and all(
        stride == 0 or size == 1 for size, stride in zip(t.shape, t.stride())
    )


def store_for_layer(layer: int, s_k: int) -> HostKVStore:
    """The store whose keys an attention call of ``layer`` over ``s_k`` keys must read."""
    ref = _LAST_APPENDED.get(layer)
    store = ref() if ref is not None else None
    if store is None or store.lengths[layer] != s_k:
        have = None if store is None else store.lengths[layer]
        raise ValueError(
            f"attention of layer {layer} got an offloaded-cache proxy of {s_k} keys, but the "
            f"store last appended to that layer holds {have}; the attention op's layer index "
            f"must match the cache's layer_idx"
        )
    return store


_lib = torch.library.Library("ihip", "FRAGMENT")
_lib.define("kv_store_append(Tensor key, Tensor value, Tensor store_id, int layer) -> Tensor")


def _kv_store_append(key, value, store_id, layer):
    hook = hook_to_launch("append", layer)
    if hook is not None:  # a whole decode step being captured: the launch only
        hook.launch(key, value)
        return torch.full((1,), float("nan"), dtype=key.dtype, device=key.device)
    store_key = int(store_id.reshape(-1)[0])
    store = _STORES.get(store_key)
    if store is None:
        raise ValueError(f"no offloaded KV store with id {store_key} (was its cache deleted?)")
    store.append(layer, key, value)
    mark_appended(layer, store)
    graph = store.append_graphs.get(layer) if key.shape[2] == 1 else None
    observe(AppendHook(store, layer, graph) if graph is not None and graph.last_call_replayed
            else None)
    return torch.full((1,), float("nan"), dtype=key.dtype, device=key.device)


torch.library.impl("ihip::kv_store_append", "CompositeExplicitAutograd", lib=_lib)(
    _kv_store_append
)


@torch.library.register_fake("ihip::kv_store_append", lib=_lib)
def _kv_store_append_fake(key, value, store_id, layer):
    return key.new_empty((1,))
