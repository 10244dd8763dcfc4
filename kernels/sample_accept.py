"""sample_accept: THE acceptance rule for sampling (lossless rejection sampling with the drafter's real
distribution), defined once in `reference`, and its kernel (one launch, no host sync).

With block ids [bs, B] = [anchor, d_1..d_(B-1)], draft distributions q [bs, B-1, V] (d_i was drawn from q_i),
target distributions p [bs, B, V] (already temperature / top-k / top-p / min-p processed), uniforms
u [bs, B-1] and exponentials e [bs, V] (Exp(1) draws; both from a seeded torch.Generator, so results are
reproducible under a seed):
    keep d_i while u_i * q_i(d_i) < p_i(d_i)                      -> accept_len a [bs] int64, 0..B-1
    residual = max(0, p_a - q_a)   (q_(B-1) := 0: all kept -> p_(B-1))
    bonus = argmax_v residual_v / e_v   (an exponential race: a draw from residual / sum(residual));
            where the residual is all zero (p_a == q_a), the same race over p_a   -> bonus [bs] int64
Reference: `reference` below, used as the rule by the reference loop (`sglang_dflash.reference`) and the
worker; the commit layout is `greedy_accept.committed_tokens`. Tolerance: exact (same inputs, same float32
arithmetic; the kernel divides with round-to-nearest).
Versions: Triton 3.x; checked on CPU under TRITON_INTERPRET=1 (tests/kernel_cases.py), distribution
checked by chi-square there too.
"""

from __future__ import annotations

import torch

from . import lazy_jit


def reference(
    block_ids: torch.Tensor,  # [bs, B] int64: anchor, then drafts d_i ~ q_i
    q: torch.Tensor,  # [bs, B-1, V] float: the distributions the drafts were drawn from
    p: torch.Tensor,  # [bs, B, V] float: the target's processed distribution after each block position
    uniforms: torch.Tensor,  # [bs, B-1] float in [0, 1): one per draft
    exponentials: torch.Tensor,  # [bs, V] float: Exp(1) draws for the bonus race
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> accept_len [bs] int64 (0..B-1), bonus [bs] int64."""
    bs, B = block_ids.shape
    V = p.shape[-1]
    # keep d_i with probability min(1, p(d_i) / q(d_i)), i.e. while u_i * q(d_i) < p(d_i);
    # at the first rejection a, the bonus is drawn from norm(max(0, p_a - q_a));
    # every draft kept: q_(B-1) := 0, so the same formula draws the bonus from p_(B-1).
    drafts = block_ids[:, 1:, None]
    p_x = p[:, :-1].gather(2, drafts)[..., 0]
    q_x = q.gather(2, drafts)[..., 0]
    accept_len = (uniforms * q_x < p_x).long().cumprod(dim=1).sum(dim=1)
    q_pad = torch.cat([q, q.new_zeros(bs, 1, V)], dim=1)
    idx = accept_len[:, None, None].expand(bs, 1, V)
    p_a = p.gather(1, idx)[:, 0].float()
    residual = (p_a - q_pad.gather(1, idx)[:, 0].float()).clamp_min(0)
    # a draw from w / sum(w) is argmax_v w_v / e_v (exponential race); p_a == q_a leaves no residual
    # (rejection then had probability 0): race over p_a instead
    e = exponentials.float()
    race_r = torch.where(residual > 0, residual / e, torch.full_like(e, -1.0))
    race_p = torch.where(p_a > 0, p_a / e, torch.full_like(e, -1.0))
    bonus = torch.where(residual.sum(dim=1) > 0, race_r.argmax(dim=1), race_p.argmax(dim=1))
    return accept_len, bonus


def triton_impl(block_ids, q, p, uniforms, exponentials, out=None):
    """`out`: optional (accept_len, bonus) buffers to write into (persistent or test-poisoned)."""
    import triton

    bs, B = block_ids.shape
    V = p.shape[-1]
    dev = block_ids.device
    if out is None:
        out = (torch.empty(bs, dtype=torch.int64, device=dev), torch.empty(bs, dtype=torch.int64, device=dev))
    accept_len, bonus = out
    q, p, uniforms, exponentials = (t.float().contiguous() for t in (q, p, uniforms, exponentials))
    if bs:
        _kernel()[(bs,)](block_ids.contiguous(), q, p, uniforms, exponentials, accept_len, bonus, V,
                         B=B, BLOCK_B=triton.next_power_of_2(B), BLOCK_V=1024)
    return accept_len, bonus


@lazy_jit
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sample_accept_kernel(block_ptr, q_ptr, p_ptr, u_ptr, e_ptr, accept_ptr, bonus_ptr, V,
                             B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_B)
        live = j < B - 1
        d = tl.load(block_ptr + i * B + 1 + j, mask=live, other=0).to(tl.int64)
        p_x = tl.load(p_ptr + (i * B + j) * V + d, mask=live, other=0.0)
        q_x = tl.load(q_ptr + (i * (B - 1) + j) * V + d, mask=live, other=0.0)
        u = tl.load(u_ptr + i * (B - 1) + j, mask=live, other=1.0)
        reject = (u * q_x >= p_x) | (j >= B - 1)
        a = tl.min(tl.where(reject, j, BLOCK_B), axis=0).to(tl.int64)  # first rejection = drafts kept
        has_q = a < B - 1
        best_r = -2.0
        best_p = -2.0
        idx_r = 0
        idx_p = 0
        total = 0.0
        for start in range(0, V, BLOCK_V):
            v = start + tl.arange(0, BLOCK_V)
            m = v < V
            pv = tl.load(p_ptr + (i * B + a) * V + v, mask=m, other=0.0)
            qv = tl.load(q_ptr + (i * (B - 1) + a) * V + v, mask=m & has_q, other=0.0)
            e = tl.load(e_ptr + i * V + v, mask=m, other=1.0)
            r = tl.maximum(pv - qv, 0.0)
            total += tl.sum(r, axis=0)
            score_r = tl.where(r > 0, tl.math.div_rn(r, e), -1.0)
            score_p = tl.where(pv > 0, tl.math.div_rn(pv, e), -1.0)
            c_r = tl.max(score_r, axis=0)
            c_p = tl.max(score_p, axis=0)
            k_r = tl.argmax(score_r, axis=0) + start
            k_p = tl.argmax(score_p, axis=0) + start
            idx_r = tl.where(c_r > best_r, k_r, idx_r)  # strict: ties keep the earliest index
            idx_p = tl.where(c_p > best_p, k_p, idx_p)
            best_r = tl.maximum(best_r, c_r)
            best_p = tl.maximum(best_p, c_p)
        tl.store(accept_ptr + i, a)
        tl.store(bonus_ptr + i, tl.where(total > 0, idx_r, idx_p).to(tl.int64))

    return sample_accept_kernel
