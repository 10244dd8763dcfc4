"""Acceptance: which drafted tokens the target keeps, and the bonus token that follows them.

Pure tensor functions (tensors in, tensors out; no host sync, no request objects).
Shapes: `bs` batch, `B` block size, `V` vocab. The verified block is `[anchor, d1 .. d(B-1)]`;
the target's verify forward gives one distribution per block position: row j predicts the token
after block position j.
"""

from __future__ import annotations

import torch


def greedy_accept(
    block_ids: torch.Tensor,  # [bs, B] int64: anchor then drafts
    target_predict: torch.Tensor,  # [bs, B] int64: target argmax after each block position
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> accept_len [bs] int64 (drafts kept, 0..B-1), bonus_token [bs] int64.

    A draft d_i is kept while every draft before it was kept and it equals the target's choice
    after position i-1; the bonus is the target's choice after the last kept token.
    """
    matches = block_ids[:, 1:] == target_predict[:, :-1]  # [bs, B-1]
    accept_len = matches.long().cumprod(dim=1).sum(dim=1)
    bonus = target_predict.gather(1, accept_len[:, None])[:, 0]
    return accept_len, bonus


def sample_accept(
    block_ids: torch.Tensor,  # [bs, B] int64: anchor then drafts d_i ~ q_i
    draft_probs: torch.Tensor,  # [bs, B-1, V] float: q_i, the distribution d_i was drawn from
    target_probs: torch.Tensor,  # [bs, B, V] float: p_j after block position j (already processed)
    uniforms: torch.Tensor,  # [bs, B-1] float in [0, 1): one per draft
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative rejection sampling with the drafter's real distribution.

    Keep d_i with probability min(1, p(d_i) / q(d_i)), i.e. when u_i * q(d_i) < p(d_i);
    at the first rejection j, draw the bonus from norm(max(0, p_j - q_j));
    if every draft is kept, draw the bonus from p_{B-1}.
    -> accept_len [bs] int64, bonus_token [bs] int64.
    """
    bs, B = block_ids.shape
    drafts = block_ids[:, 1:, None]  # [bs, B-1, 1]
    p_x = target_probs[:, :-1].gather(2, drafts)[..., 0]  # [bs, B-1]
    q_x = draft_probs.gather(2, drafts)[..., 0]
    keep = uniforms * q_x < p_x
    accept_len = keep.long().cumprod(dim=1).sum(dim=1)  # [bs]
    # q padded with zeros at the last row makes "all kept" the same formula: residual = p_{B-1}.
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(bs, 1, draft_probs.shape[-1])], dim=1)
    idx = accept_len[:, None, None].expand(bs, 1, target_probs.shape[-1])
    p_a = target_probs.gather(1, idx)[:, 0]  # [bs, V]
    residual = (p_a - q_pad.gather(1, idx)[:, 0]).clamp_min(0)
    total = residual.sum(dim=1, keepdim=True)
    # p == q exactly leaves no residual mass; then rejection had probability 0, any valid row works.
    residual = torch.where(total > 0, residual, p_a)
    bonus = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return accept_len, bonus
