"""A device copy of the keys that a decode refresh's stage 0 probes first, for keys in host memory.

Stage 0 reads its probes in pinned host memory (``host_keys``): ~18 keys of every 256 at 1M
tokens, over PCIe, ~4.5 ms per Llama-3.1-8B layer on an H200, whatever the launch
(reports/bench/admission_graphs/). The first step of every chunk's search probes the middle key
of each part of ``stride`` keys (8 parts of a 256-key chunk: keys 16, 48, 80...), the same
positions at every refresh, so those keys, 1 in ``stride``, are kept on the device too and the
stage kernel reads them there (``prune_stage``): the first step's 8 of the 18 probes no longer
cross PCIe. At 1M tokens that is 64 MiB per layer (8 KV heads, head dim 128, 16-bit keys).

Keys never change once written, so the copy only grows: each refresh copies the entries whose key
has been appended since the last one (a whole prompt's at the first). A reset store drops it.
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.block_bank import host_blocks
from ihip_compile.kernels.prune_stage_ref import first_probe_count

_FILL_ENTRIES = 4096  # entries gathered per copy: bounds the transient device buffer
# The densest first step that still gets a copy: 1 key in 16 is 3% of the KV cache on the
# device. A first step that probes denser (more parts, as for exact chunk maxima) gets none.
MIN_STRIDE = 16


def copy_stride(chunk_size: int, first_probes: int) -> int:
    """Keys per copied probe for a stage 0 of ``chunk_size``-key chunks whose first step probes
    ``first_probes`` parts; 0 where no copy is kept (probes denser than ``MIN_STRIDE``)."""
    stride = chunk_size // first_probe_count(first_probes, chunk_size)
    return stride if stride >= MIN_STRIDE else 0


class ProbeKeyCopy:
    """Keys at positions ``j * stride + stride // 2`` of one layer, on the device:
    ``keys[b, h, j]`` for ``j < filled``."""

    def __init__(self, stride: int):
        self.stride = stride
        self.keys: torch.Tensor | None = None  # [B, H_KV, room, D], storage dtype
        self.filled = 0

    def entries_for(self, length: int) -> int:
        """Entries whose key is among the first ``length`` keys."""
        return max(0, (length - self.stride // 2 + self.stride - 1) // self.stride)

    def update(self, host_keys: torch.Tensor, batch: int, length: int, capacity: int,
               device: torch.device) -> torch.Tensor:
        """Copy the entries appended since the last call from the block-major host keys
        [B * N_BLOCKS, H_KV, BLOCK, D]; returns the filled copy [B, H_KV, filled, D]."""
        blocks_per_row, heads, block, dim = host_keys.shape[0] // batch, *host_keys.shape[1:]
        want = self.entries_for(length)
        if self.keys is None or self.keys.shape[2] < want:
            # Room for what the store holds and an eighth more, not for its whole capacity: a
            # cache made for 4M tokens that holds 100k should not take a 4M copy.
            room = min(max(want + want // 8, _FILL_ENTRIES), self.entries_for(capacity))
            self._make_room(batch, heads, max(room, want), dim, host_keys.dtype, device)
        for lo in range(self.filled, want, _FILL_ENTRIES):
            hi = min(want, lo + _FILL_ENTRIES)
            positions = torch.arange(lo, hi, device=device) * self.stride + self.stride // 2
            rows = torch.arange(batch, device=device)[:, None] * blocks_per_row \
                + positions // block
            got = host_blocks(host_keys, rows.flatten(), device, host_keys.dtype)
            within = (positions % block).repeat(batch)
            picked = got[torch.arange(within.numel(), device=device), :, within]
            self.keys[:, :, lo:hi] = picked.view(batch, hi - lo, heads, dim).transpose(1, 2)
        self.filled = max(self.filled, want)
        return self.keys[:, :, : self.filled]

    def _make_room(self, batch, heads, room, dim, dtype, device) -> None:
        with torch.inference_mode(False):  # kept across calls, in and out of inference mode
            keys = torch.empty((batch, heads, room, dim), dtype=dtype, device=device)
        if self.keys is not None:
            keys[:, :, : self.filled] = self.keys[:, :, : self.filled]
        self.keys = keys

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.numel() * self.keys.element_size()
