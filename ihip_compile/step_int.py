"""An integer of a decode step (the cache length) as a device scalar a whole-step graph reads.

A decode step's positions are the cache length added to a constant index vector
(``arange(1) + s``). Run eagerly, each is two launches and a copy into the captured step's
buffer at every step. As ``StepInt(s) + arange(1)`` inside the captured step, they cost one fill
of this module's buffer before each replay (``decode_step_replay``), whatever reads it.
``passes/fold_decode_step`` puts these modules in the folded stretch.

An elementwise op between a tensor with dimensions and a 0-d tensor gives the dtype it gives
with the Python integer (0-d tensors rank below dimensioned ones in type promotion), so the
values are the same either way.
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.cuda_graph import stream_capturing


class StepInt(torch.nn.Module):
    """``forward(s)``: a 0-d int64 tensor on ``device`` holding ``s``. Run normally it fills
    its buffer with ``s``; while a step is captured it returns the buffer as it is, and the
    replay fills it (``set``) before each launch."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        with torch.inference_mode(False):  # filled in and out of inference mode
            self.value = torch.zeros((), dtype=torch.int64, device=self.device)

    def forward(self, s: int) -> torch.Tensor:
        if not stream_capturing():
            self.set(s)
        return self.value

    def set(self, s: int) -> None:
        self.value.fill_(s)
