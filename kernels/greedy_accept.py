"""greedy_accept: THE acceptance rule (greedy) and the commit layout, defined once; and its kernel.

`accept` is the rule and `committed_tokens` the layout of what a step commits; the reference loop
(`sglang_dflash.reference`), the worker (through `reference` or the Triton kernel) and the tests all use
them. With block ids [bs, B] = [anchor, d_1..d_(B-1)], target argmax predict [bs, B], committed lengths L [bs]:
    accept_len[i] = number of leading j with d_(j+1) == predict[i, j]        [bs] int64, 0..B-1
    bonus[i]      = predict[i, accept_len[i]]                               [bs] int64
    out[i]        = [d_1 .. d_a, bonus, 0 ...]                              [bs, B] int64
    new_lens[i]   = L_i + accept_len[i] + 1                                 [bs] int64
Reference: `reference` below (`accept` + `committed_tokens` + the new lengths). Tolerance: exact.
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from . import lazy_jit


def accept(block_ids: torch.Tensor, target_predict: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_ids [bs, B] (anchor, then drafts), target_predict [bs, B] (target argmax after each block
    position) -> accept_len [bs] int64 (drafts kept, 0..B-1), bonus [bs] int64.

    A draft d_i is kept while every draft before it was kept and it equals the target's choice after
    position i-1; the bonus is the target's choice after the last kept token."""
    matches = block_ids[:, 1:] == target_predict[:, :-1]  # [bs, B-1]
    accept_len = matches.long().cumprod(dim=1).sum(dim=1)
    bonus = target_predict.gather(1, accept_len[:, None])[:, 0]
    return accept_len, bonus


def committed_tokens(drafts: torch.Tensor, accept_len: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """drafts [bs, B-1], accept_len [bs], bonus [bs] -> [bs, B]: row i = d_1..d_a, bonus, then zeros.
    What one step commits (the scheduler reads the first a+1 entries); both acceptance rules use it."""
    out = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], 1)], dim=1)
    out = out.masked_fill(torch.arange(out.shape[1], device=out.device)[None] > accept_len[:, None], 0)
    return out.scatter(1, accept_len[:, None], bonus[:, None])


def reference(block_ids, target_predict, seq_lens):
    accept_len, bonus = accept(block_ids, target_predict)
    return accept_len, bonus, committed_tokens(block_ids[:, 1:], accept_len, bonus), seq_lens.long() + accept_len + 1


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
