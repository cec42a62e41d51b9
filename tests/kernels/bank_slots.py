"""Keys or values laid out as a bank's slots (``bank_kv.BankKV``), for tests of the kernels that
read them there."""

import torch

PAGE = 8


def scatter_into_bank(keys: torch.Tensor, blocks_per_row: int, spare_slots: int, seed: int):
    """``keys`` [B, H_KV, S, D] scattered block by block over shuffled slots of a bank with
    ``spare_slots`` more slots holding NaN (read by nothing); returns (slots, slot_of_block)."""
    b, h_kv, s, d = keys.shape
    n_blocks = -(-s // PAGE)
    padded = torch.zeros(b, h_kv, n_blocks * PAGE, d, dtype=keys.dtype, device=keys.device)
    padded[:, :, :s] = keys
    by_block = padded.view(b, h_kv, n_blocks, PAGE, d).permute(0, 2, 1, 3, 4).reshape(-1, h_kv,
                                                                                    PAGE, d)
    n_slots = b * n_blocks + spare_slots
    order = torch.randperm(n_slots, generator=torch.Generator().manual_seed(seed))[: b * n_blocks]
    slots = torch.full((n_slots, h_kv, PAGE, d), float("nan"), dtype=keys.dtype,
                       device=keys.device)
    slots[order.to(keys.device)] = by_block
    table = torch.full((b, blocks_per_row), -1, dtype=torch.int64)
    table[:, :n_blocks] = order.view(b, n_blocks)
    return slots, table.view(-1).to(keys.device)
