"""Keys or values read where they lie: the slots of a layer's attention or pruning bank.

Between selection refreshes a decode step attends blocks that all sit in the layer's attention
bank (``resident_blocks``). Copying them into a full-length scratch first, so that the decode
kernel finds key s at row s, costs two copies per layer and step and a [B, H_KV, S_K, D] value
buffer. Instead the decode kernel reads the bank itself, as paged attention does: key s of batch
row b lies in slot ``slot_of_block[b * BLOCKS_PER_ROW + s // PAGE]`` at row ``s % PAGE``
(``decode_addressing``). This class stands in for the [B, H_KV, S_K, D] tensor the kernel
otherwise gets; ``as_tensor`` is that tensor, and the reference reads the rows it attends from
the slots (``rows_at``: only those, so the CPU path stays proportional to the attended keys).

A decode refresh of the later pruning stages scores keys of the chunks stage 0 kept, and those
sit in the pruning bank: the stage kernels read them in its slots too (``addressing``), so no
[B, H_KV, S_K, D] key scratch is needed for them either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BankKV:
    """Bank slots [N_SLOTS, H_KV, PAGE, D] seen as sequences [B * groups, H_KV / groups, S, D]."""

    slots: torch.Tensor
    slot_of_block: torch.Tensor  # [B * blocks_per_row] int64 slot of each block, -1: not held
    batch: int
    blocks_per_row: int
    length: int  # S: keys per row
    groups: int = 1  # selection sequences per row (``selection_scope``)
    # The dtype scores are computed in, when ``slots`` store narrower keys (float8_e4m3fn); the
    # kernels widen each key they read. None: the slots' dtype.
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.slots.dim() != 4 or self.slots.stride(-1) != 1:
            raise ValueError(f"slots must be [N_SLOTS, H_KV, PAGE, D] with unit last stride, got "
                             f"{tuple(self.slots.shape)} strides {self.slots.stride()}")
        if self.slots.stride(0) % self.slots.stride(2):
            raise ValueError("a slot's stride must be a whole number of rows")
        if self.slot_of_block.numel() < self.batch * self.blocks_per_row:
            raise ValueError(f"slot_of_block has {self.slot_of_block.numel()} entries, fewer than "
                             f"{self.batch} rows x {self.blocks_per_row} blocks")
        if -(-self.length // self.page_tokens) > self.blocks_per_row:
            raise ValueError(f"{self.length} keys do not fit {self.blocks_per_row} blocks of "
                             f"{self.page_tokens} per row")

    @property
    def page_tokens(self) -> int:
        return self.slots.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        heads = self.slots.shape[1] // self.groups
        return (self.batch * self.groups, heads, self.length, self.slots.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.slots.dtype

    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def is_cuda(self) -> bool:
        return self.slots.is_cuda

    def dim(self) -> int:
        return 4

    def fold(self, groups: int) -> "BankKV":
        """The slots as ``groups`` selection sequences per row (``selection_scope.fold_heads``)."""
        return BankKV(self.slots, self.slot_of_block, self.batch, self.blocks_per_row,
                      self.length, self.groups * groups, self.compute_dtype)

    def addressing(self) -> dict:
        """How the stage kernels find key s of head h of sequence b: sequence b reads the page
        table row ``b // fold`` (``table``, ``blocks_per_row`` entries a row) and starts
        ``b % fold`` sequences (``stride_b`` elements) into a slot; key s is at row ``s % PAGE``
        of slot ``table[s // PAGE]`` (``stride_blk``, ``stride_s``)."""
        heads = self.shape[1]
        return {"stride_b": heads * self.slots.stride(1), "stride_h": self.slots.stride(1),
                "stride_blk": self.slots.stride(0), "stride_s": self.slots.stride(2),
                "keys_per_block": self.page_tokens, "table": self.slot_of_block,
                "blocks_per_row": self.blocks_per_row, "fold": self.groups}

    def as_tensor(self) -> torch.Tensor:
        """The [B * groups, H_KV / groups, S, D] tensor these slots stand for (a copy); keys of
        blocks not in the bank are zeros (nothing attends them)."""
        n_blocks = -(-self.length // self.page_tokens)
        per_row = self.slot_of_block[: self.batch * self.blocks_per_row].view(self.batch, -1)
        slots = per_row[:, :n_blocks].reshape(-1)
        held = (slots >= 0).view(-1, 1, 1, 1)
        rows = torch.where(held, self.slots[slots.clamp(min=0)].to(self.dtype), 0)
        rows = rows.view(self.batch, n_blocks, *self.slots.shape[1:])
        plain = rows.permute(0, 2, 1, 3, 4).reshape(self.batch, self.slots.shape[1], -1,
                                                      self.slots.shape[3])
        return plain[:, :, : self.length].reshape(self.shape)


def rows_at(t, keys: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` ([B, H_KV, S, D] tensor or ``BankKV``) at key positions ``keys`` [B, *]
    of each sequence: [B, *, H_KV, D]; for bank slots, rows of blocks not in the bank are 0."""
    batch = torch.arange(t.shape[0], device=keys.device).view(-1, *[1] * (keys.dim() - 1))
    if not isinstance(t, BankKV):
        return t.transpose(1, 2)[batch, keys]
    heads = t.shape[1]
    row, group = batch // t.groups, batch % t.groups
    table = t.slot_of_block[: t.batch * t.blocks_per_row].view(t.batch, t.blocks_per_row)
    slot = table[row, keys // t.page_tokens][..., None]
    head = group[..., None] * heads + torch.arange(heads, device=keys.device)
    got = t.slots[slot.clamp(min=0), head, (keys % t.page_tokens)[..., None]]
    return torch.where(slot[..., None] >= 0, got, 0)


def decode_addressing(k, v) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The memory the decode kernel reads for ``k`` and ``v`` (tensors, or ``BankKV`` of one
    bank) and how key s of sequence b, head h is found in it: sequence and head strides, and for
    bank slots the page table (``PAGED``)."""
    if isinstance(k, BankKV) != isinstance(v, BankKV):
        raise ValueError("k and v must both be tensors or both bank slots")
    if not isinstance(k, BankKV):
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        return k, v, dict(strides_k=k.stride()[:3], strides_v=v.stride()[:3], table=k,
                          blocks_per_row=0, rows_per_page=0, fold=1, PAGE_TOKENS=1,
                          PAGED=False)
    same_bank = k.slot_of_block is v.slot_of_block and k.groups == v.groups
    if not same_bank or k.shape[:3] != v.shape[:3]:
        raise ValueError("paged k and v must be the same bank's slots, folded alike")
    rows_per_page = {t.slots.stride(0) // t.slots.stride(2) for t in (k, v)}
    if len(rows_per_page) != 1:
        raise ValueError("paged k and v must hold as many rows per slot (H_KV x PAGE)")
    heads = k.shape[1]

    def strides(t: BankKV) -> tuple[int, int, int]:
        # A folded sequence starts ``heads`` heads into its row's slots.
        return (heads * t.slots.stride(1), t.slots.stride(1), t.slots.stride(2))

    return k.slots, v.slots, dict(
        strides_k=strides(k), strides_v=strides(v), table=k.slot_of_block,
        blocks_per_row=k.blocks_per_row,
        rows_per_page=rows_per_page.pop(),
        fold=k.groups, PAGE_TOKENS=k.page_tokens, PAGED=True)
