"""What a padding mask hides, asked once per mask tensor rather than once per layer.

The op takes the dense path when a row has padding (the sparse kernels attend every key of a
row), so each layer must know what ``kv_valid`` [B, S_K] hides: a device-to-host sync. One case
is not padding: every row valid on the same first L keys and nothing after, the unused slots at
the end of a static cache. The op then attends those L keys as a cache of L keys
(``valid_prefix``).

The rewrite gives every attention site of one mask the same ``kv_valid`` tensor, so the answer
of the first layer of a forward serves the others; syncing in every layer kept the host from
queueing the next layers' work while the GPU ran. The answer is kept for that very tensor
object (a weak reference, and its version counter: an in-place write asks again), never for
another tensor that happens to reuse its memory.
"""

from __future__ import annotations

import weakref

import torch

_last: tuple = (None, -1, None)  # (weak reference to the tensor, its version, the answer)


def valid_prefix(kv_valid: torch.Tensor) -> int | None:
    """L when every row of ``kv_valid`` is True on keys [0, L) and False after (L >= 1), else
    None; computed once per tensor object and version."""
    global _last
    ref, version, answer = _last
    if ref is not None and ref() is kv_valid and version == kv_valid._version:
        return answer
    valid = kv_valid.bool()
    leading = valid.long().cumprod(-1).sum(-1)  # each row's run of valid keys from key 0
    pure = (leading == valid.sum(-1)).all()  # ... with no valid key after it
    low, high, pure = torch.stack([leading.min(), leading.max(), pure.long()]).tolist()
    answer = low if low == high and pure and low > 0 else None
    _last = (weakref.ref(kv_valid), kv_valid._version, answer)
    return answer


def hides_nothing(kv_valid: torch.Tensor) -> bool:
    """``bool(kv_valid.all())``, computed once per tensor object and version."""
    return valid_prefix(kv_valid) == kv_valid.shape[-1]
