"""Keys scored where they lie: the offloaded store's host copy, read by the stage kernel in place.

A decode refresh of stage 0 probes ~18 of every 256 keys (the halving search), yet streaming the
layer's keys to the device moves all of them over PCIe (2 GiB per layer at 1M tokens of a
Llama-3.1-8B layer). Pinned host memory is addressable from CUDA kernels, so the stage kernel can
read just the probed keys from host memory. The store keeps keys block-major,
[B * N_BLOCKS, H_KV, BLOCK, D], so a key's address is not one stride along the sequence: this
class tells the kernel how to find key s of head h of sequence b (``addressing``), and stands in
for the [B, H_KV, S_K, D] tensor that ``select_blocks`` otherwise gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockMajorKeys:
    """Keys [B * N_BLOCKS, H_KV, BLOCK, D] seen as sequences [B * groups, H_KV / groups, S, D]."""

    blocks: torch.Tensor
    batch: int
    length: int  # S: valid keys per row
    device: torch.device  # where the scoring runs (the kernel reads ``blocks`` from there)
    groups: int = 1  # selection sequences per row (``selection_scope``)
    # The dtype scores are computed in, when ``blocks`` store narrower keys (float8_e4m3fn):
    # the kernel widens each key it reads, ``as_tensor`` widens its copy.
    compute_dtype: torch.dtype | None = None
    # A device copy of the keys at positions j * probe_stride + probe_stride // 2 ([B, H_KV, N,
    # D], ``probe_key_copy``): a stage whose first step probes those reads them there instead.
    probe_copy: torch.Tensor | None = None
    probe_stride: int = 0

    def __post_init__(self):
        if self.blocks.dim() != 4 or self.blocks.shape[0] % self.batch:
            raise ValueError(f"blocks must be [B * N_BLOCKS, H_KV, BLOCK, D] for batch "
                             f"{self.batch}, got {tuple(self.blocks.shape)}")
        if self.groups > 1 and self.batch > 1:
            # Sequence b * groups + g would start at b * row + g * head: not one stride.
            raise ValueError("folded block-major keys need batch 1")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        heads = self.blocks.shape[1] // self.groups
        return (self.batch * self.groups, heads, self.length, self.blocks.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.blocks.dtype

    def dim(self) -> int:
        return 4

    def fold(self, groups: int) -> "BlockMajorKeys":
        """The keys as ``groups`` selection sequences per row (``selection_scope.fold_heads``)."""
        return BlockMajorKeys(self.blocks, self.batch, self.length, self.device,
                              self.groups * groups, self.compute_dtype, self.probe_copy,
                              self.probe_stride)

    def addressing(self) -> dict[str, int]:
        """Element strides of sequence, head, block and key within a block; keys per block."""
        heads, block, dim = self.blocks.shape[1:]
        s_head = self.blocks.stride(1)
        row = (self.blocks.shape[0] // self.batch) * self.blocks.stride(0)
        sequence = row if self.groups == 1 else (heads // self.groups) * s_head
        return {"stride_b": sequence, "stride_h": s_head, "stride_blk": self.blocks.stride(0),
                "stride_s": self.blocks.stride(2), "keys_per_block": block}

    def copy_addressing(self) -> dict[str, int]:
        """Element strides of sequence, head and entry in ``probe_copy``; its entry count."""
        copy = self.probe_copy
        heads = copy.shape[1] // self.groups
        sequence = copy.stride(0) if self.groups == 1 else heads * copy.stride(1)
        return {"stride_b": sequence, "stride_h": copy.stride(1), "stride_j": copy.stride(2),
                "entries": copy.shape[2]}

    def as_tensor(self) -> torch.Tensor:
        """The keys as a plain [B * groups, H_KV / groups, S, D] tensor on ``device`` (a copy).

        The blocks holding the S valid keys are copied as they lie and rearranged on the device:
        rearranging in host memory first would cost a pass over them on the CPU.
        """
        b, heads, block = self.batch, self.blocks.shape[1], self.blocks.shape[2]
        used = -(-self.length // block)
        rows = self.blocks.view(b, -1, *self.blocks.shape[1:])[:, :used]
        # Pinned memory, written only in stream order (appends) or after a device wait: the copy
        # need not stop the host.
        rows = rows.to(self.device, non_blocking=True).to(self.dtype)
        plain = rows.permute(0, 2, 1, 3, 4).reshape(b, heads, -1, self.blocks.shape[3])
        return plain[:, :, : self.length].reshape(*self.shape)
