"""Whether a padding mask hides any key, asked once per mask tensor rather than once per layer.

The op takes the dense path when a row has padding (the sparse kernels attend every key of a
row), so each layer must know whether ``kv_valid`` [B, S_K] is all True: a device-to-host sync.
The rewrite gives every attention site of one mask the same ``kv_valid`` tensor, so the answer
of the first layer of a forward serves the others; syncing in every layer kept the host from
queueing the next layers' work while the GPU ran. The answer is kept for that very tensor
object (a weak reference, and its version counter: an in-place write asks again), never for
another tensor that happens to reuse its memory.
"""

from __future__ import annotations

import weakref

import torch

_last: tuple = (None, -1, False)  # (weak reference to the tensor, its version, the answer)


def hides_nothing(kv_valid: torch.Tensor) -> bool:
    """``bool(kv_valid.all())``, computed once per tensor object and version."""
    global _last
    ref, version, answer = _last
    if ref is not None and ref() is kv_valid and version == kv_valid._version:
        return answer
    answer = bool(kv_valid.all())
    _last = (weakref.ref(kv_valid), kv_valid._version, answer)
    return answer
