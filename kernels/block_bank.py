"""A GPU bank of recently used K/V blocks of one layer, least recently used evicted first.

Host memory holds every block (``kv_store``); a block that is not in the bank (a miss) is read
by the gather kernel straight from host memory (pinned and registered with CUDA, so addressable
by GPU kernels: only the missed blocks cross PCIe, with no host-side gather or staging copy),
served, and admitted into the bank, evicting the least recently used blocks that this read did
not touch. Between selection refreshes a decode step asks for the same blocks again, so it is
served from the bank.

The bookkeeping lives on the bank's device as tensors, so a read costs no host sync and no
Python operation per block (a sync would stop the host from queueing the next layers' work while
the GPU runs this one):
    slot_of_block  [N_BLOCKS] int64   bank slot holding each block, -1: only in host memory
    block_of_slot  [N_SLOTS]  int64   block held by each slot, -1 when the slot is free
    last_used      [N_SLOTS]  int64   read clock value of the slot's last use (-1: never)
    clock          [1]        int64   reads so far, counted by the reads themselves
Blocks are written through: tokens appended to a block that is in the bank land in both copies
(``token_append``). On CUDA, a bank built with a graph pool replays each kind of read as a CUDA
graph (``replayed_work``): a read's admission bookkeeping, and for a fetch also the copies of its
misses and the ops that name its blocks, ~40-70 launches that were most of a refresh's host time.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from ihip_compile.kernels.block_cache_ref import as_bits, gather_blocks_ref
from ihip_compile.kernels.replayed_work import Padded, ReplayedWork, padded_size, run_as_is

# Reads are padded to a multiple of this many blocks (the extra entries name no block): a decode
# read's size moves with its window, which widens by a block every few steps until stage 0 runs
# again, and one capture then serves them all.
SIZE_STEP = 64


def gather_blocks(bank, staging, slots, staged, *, out_dtype):
    """Kernel on CUDA (``staging`` may be registered host memory), reference elsewhere (the two
    agree bit for bit, tests/offload)."""
    if bank.is_cuda:
        from ihip_compile.kernels.block_cache import gather_blocks as triton_gather

        return triton_gather(bank, staging, slots, staged, out_dtype=out_dtype)
    return gather_blocks_ref(bank, staging, slots, staged, out_dtype=out_dtype)


def host_blocks(host: torch.Tensor, rows: torch.Tensor, device: torch.device,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Blocks ``rows`` [N] (on ``device``) of a block-major host copy, read in place by the
    gather kernel on CUDA (no staging copy): [N, *block_shape] on ``device``. A row of -1 names
    no block: what it yields is for a spare place (``spare_for_unnamed``)."""
    if device.type == "cuda":
        from ihip_compile.kernels.block_cache import gather_blocks as triton_gather

        misses = torch.full_like(rows, -1)
        return triton_gather(host[:1], host, misses, rows, out_dtype=out_dtype,
                             out_device=device)
    return as_bits(host)[rows.to(host.device)].view(host.dtype).to(device, out_dtype)


def host_blocks_into(host: torch.Tensor, rows: torch.Tensor, out: torch.Tensor,
                     dest: torch.Tensor) -> None:
    """Blocks ``rows`` [N] of a block-major host copy written to rows ``dest`` [N] of ``out``
    ([M, *block_shape] on the device, any strides with the last one 1; -1 in ``rows``: zeros,
    for a spare row), read in place by the gather kernel on CUDA with no temporary."""
    if out.is_cuda:
        from ihip_compile.kernels.block_cache import gather_blocks as triton_gather

        triton_gather(host[:1], host, torch.full_like(rows, -1), rows, out=out, dest=dest)
        return
    gather_blocks_ref(host[:1], host, torch.full_like(rows, -1), rows.to(host.device),
                      out_dtype=out.dtype, out=out, dest=dest.to(out.device))


def row_block_ids(block_ids: torch.Tensor, blocks_per_row: int) -> torch.Tensor:
    """Blocks ``block_ids`` [B, N] of each row as ids in a bank shared by the rows (row b's
    blocks follow row b - 1's); -1 (no block) stays -1."""
    rows = torch.arange(block_ids.shape[0], device=block_ids.device)[:, None] * blocks_per_row
    return torch.where(block_ids >= 0, block_ids.long() + rows, -1)


def repeats(sorted_ids: torch.Tensor) -> torch.Tensor:
    """True where an id equals the one before it along the last dim (``sorted_ids`` sorted
    there): each id's first entry is False, so a set is found on the device, with no count."""
    repeated = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeated[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    return repeated


def spare_for_unnamed(block_ids: torch.Tensor, n_dst_blocks: int) -> torch.Tensor:
    """Where blocks ``block_ids`` land in a destination of ``n_dst_blocks`` blocks whose last
    block is spare: -1 (no block) lands there, so a copy needs no count known on the host."""
    return torch.where(block_ids >= 0, block_ids.long(), n_dst_blocks - 1)


class BlockBank:
    """LRU bank of ``n_slots`` blocks; ``tensors`` names what each block carries (keys, values)."""

    def __init__(self, *, n_slots: int, n_blocks: int, block_shapes: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device, graph_pool=None):
        """``graph_pool`` (a ``torch.cuda.graph_pool_handle()``, CUDA only): replay reads as
        CUDA graphs captured in it; None: ordinary launches."""
        if n_slots < 1:
            raise ValueError(f"a block bank needs at least one slot, got n_slots={n_slots}")
        self.n_slots, self.n_blocks = n_slots, n_blocks
        # Each table has one spare entry past its end (slot n_slots, block n_blocks) that takes
        # the writes a read does not want, so no write needs a count known on the host.
        self._blocks = {
            name: torch.zeros((n_slots + 1, *shape), dtype=dtype, device=device)
            for name, shape in block_shapes.items()
        }
        self.tensors = {name: t[:n_slots] for name, t in self._blocks.items()}
        self._slot_of_block = torch.full((n_blocks + 1,), -1, dtype=torch.int64, device=device)
        self._block_of_slot = torch.full((n_slots + 1,), -1, dtype=torch.int64, device=device)
        self._block_of_slot[n_slots] = n_blocks
        self._last_used = torch.full((n_slots + 1,), -1, dtype=torch.int64, device=device)
        self.slot_of_block = self._slot_of_block[:n_blocks]
        self.block_of_slot = self._block_of_slot[:n_slots]
        self.last_used = self._last_used[:n_slots]
        # A device tensor, not a host count: the captured bookkeeping reads it where it lies.
        self._clock = torch.zeros(1, dtype=torch.int64, device=device)
        self.replayed = (ReplayedWork(graph_pool, "a block bank's reads")
                         if graph_pool is not None else None)
        # Hits and misses of reads, counted on the device (read back only when reported), plus
        # the hits of resident reads, known on the host.
        self._read_counts = torch.zeros(2, dtype=torch.int64, device=device)
        self._resident_hits = 0
        # Host-side facts for callers that reuse slots (``resident_blocks``): bumped whenever a
        # read may have moved slots, and whether the last read left every block it named resident.
        self.admissions = 0
        self.last_read_resident = False

    @property
    def hits(self) -> int:
        return self._resident_hits + int(self._read_counts[0])

    @property
    def misses(self) -> int:
        return int(self._read_counts[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._blocks.values())

    def read(self, block_ids: torch.Tensor, host: dict[str, torch.Tensor],
             out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Blocks ``block_ids`` [N] of every tensor, [N, *block_shape] on the device; an id of -1
        names no block (zeros, neither read nor counted).

        ``host`` holds the full block-major host copies, [N_BLOCKS, *block_shape] each. A block
        named twice is counted and admitted once. No host sync: hits, misses and admissions are
        worked out on the device, so the host goes on queueing work while the GPU reads.
        """
        block_ids = self._on_device(block_ids)
        # The plan looks the blocks up again (inside its replay, so that a fetch needs no
        # lookup of its own); a read also needs the slots first, to gather from them.
        slots = self._slots(block_ids)
        # Misses come from their rows of the host copy: "staging" is the whole host copy.
        raw = {name: gather_blocks(self.tensors[name], host[name], slots, block_ids,
                                   out_dtype=self.tensors[name].dtype)
               for name in self.tensors}
        n = block_ids.numel()
        self._note_read(n)
        if n:
            size = padded_size(n, SIZE_STEP)
            victim, order, _, _ = self._replay(("plan", size), self._admission_plan,
                                               (Padded(block_ids, size),))
            # A padded entry's victim is the spare slot; it takes the read's last block.
            order = order.clamp(max=n - 1)
            for name, bank in self._blocks.items():
                as_bits(bank)[victim] = as_bits(raw[name])[order]
        return {name: t.to(out_dtype) for name, t in raw.items()}

    def fetch(self, block_ids: torch.Tensor, host: dict[str, torch.Tensor]) -> bool:
        """``read`` for a caller that reads the blocks in their slots (``bank_kv``): the same
        bookkeeping, but only the misses are copied, from host memory straight into the slots
        they take, and nothing is returned. A read of every block copies each one (hits out of
        the bank included) and then the whole read again into the slots; at a refresh that
        names tens of thousands of blocks, those device copies cost more than the misses.

        Returns True when every block of ``block_ids`` [N] is resident afterwards; False, with
        nothing done, when N exceeds the slots (the blocks may not all fit: ``read`` them)."""
        ids = self._on_device(block_ids)
        size = padded_size(ids.numel(), SIZE_STEP)
        return self.fetch_named(lambda named: named, ("ids", size), (Padded(ids, size),),
                                ids.numel(), host)

    def fetch_named(self, name: Callable[..., torch.Tensor], key: Hashable, inputs: tuple,
                    n: int, host: dict[str, torch.Tensor]) -> bool:
        """``fetch`` of the ``n`` blocks ``name(*inputs)`` names ([n] int64 on the device, -1:
        none; device ops only, no host value but what ``key`` names): on CUDA the naming, the
        bookkeeping and the copies replay as one graph per ``key`` and host copy. ``inputs``
        as ``ReplayedWork`` takes them. False, with nothing done, when n exceeds the slots."""
        if n > self.n_slots:
            return False
        self._note_read(n)
        if n:
            self._replay(("fetch", key, _addresses(host)),
                         lambda *named_by: self._admit(name(*named_by), host), inputs)
        return True

    def count_held_named(self, name: Callable[..., torch.Tensor], key: Hashable,
                         inputs: tuple) -> None:
        """``count_held(name(*inputs))``, replayed as one graph per ``key`` on CUDA (as
        ``fetch_named``): counting a refresh's held blocks is a dozen launches of naming them."""
        self._replay(("held", key), lambda *named_by: self.count_held(name(*named_by)), inputs)

    def _on_device(self, block_ids: torch.Tensor) -> torch.Tensor:
        return block_ids.to(device=self._block_of_slot.device, dtype=torch.int64)

    def _slots(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The slot of each of ``block_ids`` (int64 on the device), -1 for a miss."""
        return torch.where(block_ids >= 0, self._slot_of_block[block_ids], -1)

    def count_resident(self, n: int) -> None:
        """Count ``n`` blocks read in their slots (``bank_kv``), known to be there: hits."""
        self._resident_hits += n

    def count_held(self, block_ids: torch.Tensor) -> None:
        """Count blocks ``block_ids`` (distinct; -1: none) read in their slots, known to be
        there, as hits: counted on the device, as a read counts them (no host sync)."""
        held = (block_ids.to(self._read_counts.device) >= 0).sum()
        self._read_counts[0] += held

    def _note_read(self, n: int) -> None:
        """A read of ``n`` entries may move slots; it leaves all its blocks resident when they
        fit (distinct blocks <= n <= slots)."""
        self.admissions += 1
        self.last_read_resident = n <= self.n_slots

    def _replay(self, key: Hashable, work: Callable, inputs: tuple):
        if self.replayed is None:
            return run_as_is(work, inputs)
        return self.replayed(key, work, inputs)

    def _admit(self, block_ids: torch.Tensor, host: dict[str, torch.Tensor]) -> None:
        """The bookkeeping of a read of ``block_ids`` and the copies of its admitted misses,
        from the host copies straight into their slots."""
        _, _, rows, dest = self._admission_plan(block_ids)
        for name, bank in self._blocks.items():
            host_blocks_into(as_bits(host[name]), rows, as_bits(bank), dest)

    def _admission_plan(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The bookkeeping of a read of ``block_ids`` [N] (N >= 1, int64 on the device): looks
        them up, ticks the clock, counts, updates the tables. Returns, per entry of
        ``block_ids`` sorted (``order``: their places in the read), the slot its fetched block
        goes to (``victim``; the spare slot where it is not admitted), and the copies that
        admit the misses from host memory: block ``rows`` into slots ``dest`` (-1 in both where
        nothing is admitted). Device ops only, no host value: capturable."""
        self._clock += 1
        ids, order = torch.sort(block_ids)
        slots = self._slots(ids)
        first = ~repeats(ids)
        hit = slots >= 0
        miss = first & ~hit & (ids >= 0)
        n_hit, n_miss = (first & hit).sum(), miss.sum()
        self._read_counts += torch.stack([n_hit, n_miss])
        # Touched slots carry the newest clock value, so they sort after every other slot.
        self._touch(torch.where(hit, slots, self.n_slots))
        # Least recently used first, equals by slot index: the same victims whatever the read's
        # size (a captured read is padded).
        victims = torch.sort(self.last_used, stable=True).indices
        n_admit = torch.minimum(n_miss, self.n_slots - n_hit)
        from_last = n_miss - torch.cumsum(miss.long(), 0)  # 0 for the last miss, 1 before it...
        admit = miss & (from_last < n_admit)
        victim = torch.where(admit, victims[from_last.clamp(0, victims.numel() - 1)],
                             self.n_slots)
        evicted = self._block_of_slot[victim]
        self._slot_of_block.index_fill_(0, torch.where(evicted >= 0, evicted, self.n_blocks), -1)
        admitted = torch.where(admit, ids, self.n_blocks)
        self._block_of_slot[victim] = admitted
        self._slot_of_block[admitted] = victim
        self._touch(victim)
        return victim, order, torch.where(admit, ids, -1), torch.where(admit, victim, -1)

    def _touch(self, slots: torch.Tensor) -> None:
        """Stamp ``slots`` with the clock (a tensor value: no host copy, no sync)."""
        self._last_used.index_put_((slots,), self._clock.expand(slots.shape))

    def clear(self) -> None:
        self.admissions += 1
        self.slot_of_block.fill_(-1)
        self.block_of_slot.fill_(-1)
        self.last_used.fill_(-1)


def _addresses(host: dict[str, torch.Tensor]) -> tuple:
    """Where a fetch's host copies lie: a captured copy reads them there."""
    return tuple((name, t.data_ptr(), tuple(t.shape), t.dtype) for name, t in host.items())
