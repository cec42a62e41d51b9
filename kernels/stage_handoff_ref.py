"""Between two pruning stages, in torch: keep the best chunks in position order, split them.

The spec of ``stage_handoff`` (the Triton kernel) and its CPU path. A stage's output is a row of
kept chunk starts per query block, ascending, empty slots (-1) last; the next stage scores each
kept chunk's sub-chunks.
"""

import torch

_EMPTY_LAST = torch.iinfo(torch.int32).max


def keep_best_chunks(scores: torch.Tensor, starts: torch.Tensor, keep: int) -> torch.Tensor:
    """Top-``keep`` chunks by score, sorted by position; empty or unusable slots become -1 (last)."""
    if keep < scores.shape[-1]:
        scores, picked = torch.topk(scores, keep, dim=-1, sorted=False)
        starts = torch.gather(starts.expand(scores.shape[:-1] + starts.shape[-1:]), -1, picked)
    starts = torch.where(scores == float("-inf"), _EMPTY_LAST, starts.to(torch.int32))
    starts = torch.sort(starts, dim=-1).values
    return torch.where(starts == _EMPTY_LAST, -1, starts)


def split_chunks(starts: torch.Tensor, chunk: int, next_chunk: int) -> torch.Tensor:
    """[B, NQB, N] chunk starts -> [B, NQB, N * chunk / next_chunk] starts of the sub-chunks."""
    if chunk == next_chunk:
        return starts
    offsets = torch.arange(0, chunk, next_chunk, device=starts.device, dtype=torch.int32)
    parts = starts[..., None] + offsets
    parts = torch.where(starts[..., None] < 0, -1, parts)
    return parts.flatten(-2)


def stage_handoff_ref(scores, starts, keep: int, chunk: int, next_chunk: int, *,
                      block_div: int = 1, keep_kept: bool = True):
    """``(kept, children)``: the best ``keep`` chunks (all non-empty ones when ``scores`` is None)
    and ``(start + j * next_chunk) // block_div`` for each of their sub-chunks (-1 stays -1)."""
    kept = starts.to(torch.int32) if scores is None else keep_best_chunks(scores, starts, keep)
    # -1 // block_div == -1 (floor division): empty slots stay empty.
    children = split_chunks(kept, chunk, next_chunk) // block_div
    return (kept if keep_kept else None), children
