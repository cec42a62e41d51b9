"""A GPU bank of recently used K/V blocks of one layer, least recently used evicted first.

Host memory holds every block (``kv_store``); a block that is not in the bank (a miss) is read
by the gather kernel straight from host memory (pinned and registered with CUDA, so addressable
by GPU kernels: only the missed blocks cross PCIe, with no host-side gather or staging copy),
served, and admitted into the bank, evicting the least recently used blocks that this read did
not touch. Between selection refreshes a decode step asks for the same blocks again, so it is
served from the bank.

The bookkeeping lives on the bank's device as tensors, so a read costs one host sync (the number
of misses, which bounds the admission), not one Python operation per block:
    slot_of_block  [N_BLOCKS] int64   bank slot holding each block, -1: only in host memory
    block_of_slot  [N_SLOTS]  int64   block held by each slot, -1 when the slot is free
    last_used      [N_SLOTS]  int64   read counter value of the slot's last use (-1: never)
Blocks are written through: tokens appended to a block that is in the bank land in both copies
(``token_append``).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.block_cache_ref import as_bits, gather_blocks_ref


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
    gather kernel on CUDA (no staging copy): [N, *block_shape] on ``device``."""
    if device.type == "cuda":
        from ihip_compile.kernels.block_cache import gather_blocks as triton_gather

        misses = torch.full_like(rows, -1)
        return triton_gather(host[:1], host, misses, rows, out_dtype=out_dtype,
                             out_device=device)
    return as_bits(host)[rows.to(host.device)].view(host.dtype).to(device, out_dtype)


class BlockBank:
    """LRU bank of ``n_slots`` blocks; ``tensors`` names what each block carries (keys, values)."""

    def __init__(self, *, n_slots: int, n_blocks: int, block_shapes: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device):
        if n_slots < 1:
            raise ValueError(f"a block bank needs at least one slot, got n_slots={n_slots}")
        self.n_slots = n_slots
        self.tensors = {
            name: torch.zeros((n_slots, *shape), dtype=dtype, device=device)
            for name, shape in block_shapes.items()
        }
        self.slot_of_block = torch.full((n_blocks,), -1, dtype=torch.int64, device=device)
        self.block_of_slot = torch.full((n_slots,), -1, dtype=torch.int64, device=device)
        self.last_used = torch.full((n_slots,), -1, dtype=torch.int64, device=device)
        self.reads = 0
        self.hits = 0
        self.misses = 0
        # Host-side facts for callers that reuse slots (``resident_blocks``): bumped whenever a
        # slot changes hands, and whether the last read left every block it named resident.
        self.admissions = 0
        self.last_read_resident = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def read(self, block_ids: torch.Tensor, host: dict[str, torch.Tensor],
             out_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Blocks ``block_ids`` [N] of every tensor, [N, *block_shape] on the device.

        ``host`` holds the full block-major host copies, [N_BLOCKS, *block_shape] each. A block
        named twice is fetched and counted once.
        """
        device = self.block_of_slot.device
        block_ids, inverse = torch.unique(block_ids.to(device=device, dtype=torch.int64),
                                          return_inverse=True)
        self.reads += 1
        slots = self.slot_of_block[block_ids]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.reads
        miss_ids = block_ids[~hit]
        n_miss = miss_ids.numel()  # the one host sync of a read
        self.hits += block_ids.numel() - n_miss
        self.misses += n_miss
        # Misses come from their rows of the host copy: "staging" is the whole host copy.
        raw = {name: gather_blocks(self.tensors[name], host[name], slots,
                                   block_ids, out_dtype=self.tensors[name].dtype)
               for name in self.tensors}
        admitted = self._admit(miss_ids, {name: t[~hit] for name, t in raw.items()},
                               n_hit=block_ids.numel() - n_miss)
        self.last_read_resident = admitted == n_miss
        return {name: t.to(out_dtype)[inverse] for name, t in raw.items()}

    def serve_resident(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Blocks known to sit in ``slots`` [N] (nothing admitted since they were read): a read
        that is all hits, with no host sync."""
        self.reads += 1
        self.hits += slots.numel()
        self.last_used[slots] = self.reads
        return {name: as_bits(t)[slots].view(t.dtype) for name, t in self.tensors.items()}

    def _admit(self, miss_ids: torch.Tensor, fetched: dict[str, torch.Tensor], n_hit: int) -> int:
        """Move fetched blocks (``fetched[name]``: the missed blocks, in ``miss_ids`` order)
        into the least recently used slots this read did not touch; returns how many."""
        n_admit = min(miss_ids.numel(), self.n_slots - n_hit)
        if n_admit <= 0:
            return 0
        self.admissions += 1
        # Slots touched by this read carry the newest counter value, so they sort last.
        victims = torch.topk(self.last_used, n_admit, largest=False).indices
        evicted = self.block_of_slot[victims]
        self.slot_of_block[evicted[evicted >= 0]] = -1
        admitted = miss_ids[-n_admit:]
        self.block_of_slot[victims] = admitted
        self.slot_of_block[admitted] = victims
        self.last_used[victims] = self.reads
        for name, bank in self.tensors.items():
            as_bits(bank)[victims] = as_bits(fetched[name][-n_admit:])
        return n_admit

    def clear(self) -> None:
        self.admissions += 1
        self.slot_of_block.fill_(-1)
        self.block_of_slot.fill_(-1)
        self.last_used.fill_(-1)
