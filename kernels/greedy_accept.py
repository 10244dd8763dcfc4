"""greedy_accept: greedy acceptance and the committed run for a whole batch, in one launch.

With block ids [bs, B] = [anchor, d_1..d_(B-1)], target argmax predict [bs, B], committed lengths L [bs]:
    accept_len[i] = number of leading j with d_(j+1) == predict[i, j]        [bs] int64, 0..B-1
    bonus[i]      = predict[i, accept_len[i]]                               [bs] int64
    out[i]        = [d_1 .. d_a, bonus, 0 ...]                              [bs, B] int64
    new_lens[i]   = L_i + accept_len[i] + 1                                 [bs] int64
Reference: `reference` below (sglang_dflash.accept.greedy_accept + the commit layout). Tolerance: exact.
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from . import lazy_jit


def reference(block_ids, target_predict, seq_lens):
    matches = block_ids[:, 1:] == target_predict[:, :-1]
    accept_len = matches.long().cumprod(dim=1).sum(dim=1)
    bonus = target_predict.gather(1, accept_len[:, None])[:, 0]
    out = torch.cat([block_ids[:, 1:], torch.zeros_like(block_ids[:, :1])], dim=1)
    out = out.masked_fill(torch.arange(out.shape[1], device=out.device)[None] > accept_len[:, None], 0)
    out = out.scatter(1, accept_len[:, None], bonus[:, None])
    return accept_len, bonus, out, seq_lens.long() + accept_len + 1


def triton_impl(block_ids, target_predict, seq_lens, out=None):
    """`out`: optional (accept_len, bonus, out_tokens, new_lens) buffers (persistent or test-poisoned)."""
    import triton

    bs, B = block_ids.shape
    dev = block_ids.device
    if out is None:
        out = (torch.empty(bs, dtype=torch.int64, device=dev), torch.empty(bs, dtype=torch.int64, device=dev),
               torch.empty((bs, B), dtype=torch.int64, device=dev), torch.empty(bs, dtype=torch.int64, device=dev))
    accept_len, bonus, out_tokens, new_lens = out
    if bs:
        _kernel()[(bs,)](block_ids, target_predict, seq_lens, accept_len, bonus, out_tokens, new_lens,
                         B=B, BLOCK=triton.next_power_of_2(B))
    return accept_len, bonus, out_tokens, new_lens


@lazy_jit
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_accept_kernel(block_ptr, pred_ptr, seq_lens_ptr, accept_ptr, bonus_ptr, out_ptr, new_lens_ptr,
                             B: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        draft_j = j < B - 1  # d_(j+1) is compared with predict[j]
        d = tl.load(block_ptr + i * B + j + 1, mask=draft_j, other=0).to(tl.int64)
        p = tl.load(pred_ptr + i * B + j, mask=draft_j, other=0).to(tl.int64)
        miss = (d != p) | (j >= B - 1)
        a = tl.min(tl.where(miss, j, BLOCK), axis=0)  # first mismatch = number of leading matches
        bonus = tl.load(pred_ptr + i * B + a).to(tl.int64)
        out = tl.where(j < a, d, tl.where(j == a, bonus, 0))
        tl.store(out_ptr + i * B + j, out, mask=j < B)
        tl.store(accept_ptr + i, a)
        tl.store(bonus_ptr + i, bonus)
        tl.store(new_lens_ptr + i, tl.load(seq_lens_ptr + i).to(tl.int64) + a + 1)

    return greedy_accept_kernel
