"""block_prep: the next block of every request, in one launch.

Computes, for each request i with committed length L_i, bonus token b_i and req_to_token row r_i:
    ids[i]       = [b_i, mask_id, ..., mask_id]            [bs, B] int64
    positions[i] = L_i + [0, 1, ..., B-1]                  [bs, B] int64
    slots[i]     = req_to_token[r_i, L_i : L_i + B]        [bs, B] int64
Reference: `reference` below. Tolerance: exact (integer outputs).
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from . import lazy_jit


def reference(bonus, seq_lens, req_pool_indices, req_to_token, mask_id: int, B: int, out=None):
    positions = seq_lens[:, None].long() + torch.arange(B, device=seq_lens.device)
    slots = req_to_token[req_pool_indices.long()[:, None], positions].long()
    ids = torch.full_like(positions, mask_id)
    ids[:, 0] = bonus
    if out is None:
        return ids, positions, slots
    for buf, value in zip(out, (ids, positions, slots)):
        buf.copy_(value)
    return out


def triton_impl(bonus, seq_lens, req_pool_indices, req_to_token, mask_id: int, B: int, out=None):
    """`out`: optional (ids, positions, slots) buffers to write into (persistent or test-poisoned)."""
    import triton

    bs = bonus.shape[0]
    dev = bonus.device
    if out is None:
        out = tuple(torch.empty((bs, B), dtype=torch.int64, device=dev) for _ in range(3))
    ids, positions, slots = out
    if bs:
        _kernel()[(bs,)](bonus, seq_lens, req_pool_indices, req_to_token, req_to_token.stride(0), ids, positions,
                         slots, mask_id, B=B, BLOCK=triton.next_power_of_2(B))
    return ids, positions, slots


@lazy_jit
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_prep_kernel(bonus_ptr, seq_lens_ptr, rows_ptr, r2t_ptr, r2t_stride, ids_ptr, pos_ptr, slots_ptr,
                          mask_id, B: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        live = j < B
        L = tl.load(seq_lens_ptr + i).to(tl.int64)
        row = tl.load(rows_ptr + i).to(tl.int64)
        bonus = tl.load(bonus_ptr + i).to(tl.int64)
        pos = L + j
        slot = tl.load(r2t_ptr + row * r2t_stride + pos, mask=live, other=0).to(tl.int64)
        ids = tl.where(j == 0, bonus, mask_id)
        tl.store(ids_ptr + i * B + j, ids, mask=live)
        tl.store(pos_ptr + i * B + j, pos, mask=live)
        tl.store(slots_ptr + i * B + j, slot, mask=live)

    return block_prep_kernel
