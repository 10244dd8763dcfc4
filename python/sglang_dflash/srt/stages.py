"""The stages of one SGLang decode step, as functions of tensors and SGLang's batch objects.

    block_layout -> propose (draft tokens) -> verify_ids -> accept (tokens to commit, new lengths)

The acceptance rule itself is defined once in `dflash_kernels` (greedy_accept.accept / sample_accept.reference,
and the commit layout greedy_accept.committed_tokens); `accept` here picks the kernel or its reference.
The drafter's context write (target hidden states -> drafter K/V) is `context.ContextWriter`; what a step
returns beside its tokens (hidden states, logprobs, sampling masks) is `outputs.py`; the step record the
worker passes between these calls is `step.Step`.

Shapes: `bs` requests, `k` the step's verify width (1 <= k <= B; `adaptive.py` picks it), `B` the block size,
`V` vocab, `H` hidden, `K*H` concatenated target features, `num_tokens` the tokens of an extend.
"""

from __future__ import annotations

from typing import NamedTuple

import dflash_kernels
import torch
import torch.nn.functional as F
from dflash_kernels.greedy_accept import committed_tokens

from ..sampling import processed_probs


class BlockLayout(NamedTuple):
    ids: torch.Tensor  # [bs, k] int64: [bonus, MASK, ..., MASK]
    positions: torch.Tensor  # [bs, k] int64: L_i + j
    slots: torch.Tensor  # [bs, k] int64: KV slot ids req_to_token[row_i, L_i + j]


class StepBuffers:
    """A step's block scratch, allocated once for the most requests SGLang can run at a time (its
    req_to_token rows) at the full block width B, and viewed per step as [bs, k] for the step's verify width k:
    block ids, positions and the verify ids. Not pooled: what
    SGLang may keep past the step: the outputs (the scheduler reads them while the next step runs under
    overlap scheduling) and the block's KV slots (they become `batch.out_cache_loc`, which SGLang 0.5.23
    hands to a unified-memory allocator as this forward's write set). CUDA graphs need none of this:
    SGLang's graph runners copy inputs into their own static buffers at replay."""

    def __init__(self, max_requests: int, B: int, device) -> None:
        new = lambda: torch.empty(max_requests * B, dtype=torch.int64, device=device)  # noqa: E731
        self.max_requests = max_requests
        self._ids, self._positions, self._verify_ids = new(), new(), new()

    def _check(self, bs: int) -> None:
        if bs > self.max_requests:
            raise ValueError(f"sglang-dflash: batch of {bs} requests, step buffers sized for {self.max_requests}")

    def block(self, bs: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, positions, slots) [bs, k]; slots freshly allocated (see above)."""
        self._check(bs)
        positions = self._positions[: bs * k].view(bs, k)
        return self._ids[: bs * k].view(bs, k), positions, torch.empty_like(positions)

    def verify_ids(self, bs: int, k: int) -> torch.Tensor:
        self._check(bs)
        return self._verify_ids[: bs * k].view(bs, k)


def block_layout(batch, bonus: torch.Tensor, mask_id: int, k: int, buffers: StepBuffers) -> BlockLayout:
    """The next block of every request at verify width k (kernel `block_prep`), written into the step buffers."""
    prep = dflash_kernels.get("block_prep", bonus.device)
    return BlockLayout(*prep(bonus, batch.seq_lens, batch.req_pool_indices, batch.req_to_token_pool.req_to_token,
                             mask_id, k, out=buffers.block(bonus.shape[0], k)))


def set_block_key_lengths(batch, k: int) -> None:
    """The host lengths a block forward's attention metadata reads: L + k keys per request (context, then the
    block of width k). SGLang 0.5.23's own DFLASH does the same: FlashInfer's CUDA-graph replay plan builds its
    key offsets from `seq_lens_cpu`, which must then match the device offsets (L + k); the device `seq_lens`
    stay L, since FA3 and triton add k themselves. Host tensors and ints only (no sync); the scheduler
    restores both fields after the step. Under overlap scheduling SGLang leaves `seq_lens_cpu` unset for backends
    that declare they need no host lengths (FA3): then both stay as they are."""
    if batch.seq_lens_cpu is None:
        return
    batch.seq_lens_cpu = batch.seq_lens_cpu + k
    batch.seq_lens_sum = batch.seq_lens_sum + k * batch.seq_lens_cpu.shape[0]


def verify_ids(block: BlockLayout, drafts: torch.Tensor, buffers: StepBuffers) -> torch.Tensor:
    """[anchor, d_1 .. d_(k-1)] per request: the tokens the target verifies [bs, k]."""
    out = buffers.verify_ids(*block.ids.shape)
    out[:, :1] = block.ids[:, :1]
    out[:, 1:] = drafts
    return out


def extend_positions(batch) -> torch.Tensor:
    """Absolute positions [num_tokens] of the tokens an extend batch computes (prefix hits skipped)."""
    dev = batch.seq_lens.device
    return torch.cat([torch.arange(p, p + n, device=dev) for p, n in zip(batch.prefix_lens, batch.extend_lens)])


def _sampling_tensors(sampling_info, rows: int, vocab: int):
    """Per-request (temperature, top_k, top_p, min_p) repeated for `rows` rows per request."""
    rep = lambda t: t.reshape(-1).repeat_interleave(rows)  # noqa: E731
    top_k = sampling_info.top_ks.long().clamp(max=vocab)
    return rep(sampling_info.temperatures), rep(top_k), rep(sampling_info.top_ps), rep(sampling_info.min_ps)


def _sampling_shortcuts(sampling_info) -> dict:
    """The host-side batch facts SGLang's own sampler uses to skip the sort (`sampling.processed_probs`)."""
    filtered = (sampling_info.need_top_k_sampling or sampling_info.need_top_p_sampling
                or sampling_info.need_min_p_sampling)
    return dict(filtered=filtered, max_top_k=sampling_info.max_top_k)


class Proposal(NamedTuple):
    drafts: torch.Tensor  # [bs, k-1] int64
    q: torch.Tensor | None  # [bs, k-1, V] float32: what each draft was drawn from; None when all greedy
    nonfinite: torch.Tensor | None  # [bs] bool: the drafter's logits held NaN or inf (a broken drafter)


def no_drafts(bs: int, vocab: int, sampling_info, device) -> Proposal:
    """The proposal of a width-1 step (a plain target decode): no drafts, no drafter forward."""
    drafts = torch.empty((bs, 0), dtype=torch.int64, device=device)
    q = None if sampling_info.is_all_greedy else torch.empty((bs, 0, vocab), dtype=torch.float32, device=device)
    return Proposal(drafts, q, None)


def propose(draft_logits: torch.Tensor, sampling_info) -> Proposal:
    """draft_logits [bs, k-1, V] -> the drafts.

    Sampling requests draw each draft from the drafter's own distribution, processed with the request's
    temperature / top-k / top-p / min-p, so acceptance can use the real q (not a point mass). A broken
    drafter (NaN / inf logits) may only cost acceptance: greedy drafts are then some valid id the target
    rejects, and a q row with no finite mass becomes a point mass on token 0 (any q the draft is really
    drawn from keeps rejection sampling exact)."""
    # one reduction over the logits (no [bs, k-1, V] temporary): any NaN or inf makes its row's sum non-finite
    nonfinite = ~torch.isfinite(draft_logits.sum(dim=-1)).all(dim=-1)
    if sampling_info.is_all_greedy:
        return Proposal(draft_logits.argmax(dim=-1), None, nonfinite)
    bs, n, V = draft_logits.shape
    q = processed_probs(draft_logits.reshape(bs * n, V), *_sampling_tensors(sampling_info, n, V),
                        **_sampling_shortcuts(sampling_info))
    mass = q.sum(dim=-1, keepdim=True)
    usable = torch.isfinite(mass) & (mass > 0)  # NaN > 0 is False
    q = torch.where(usable, q, F.one_hot(torch.zeros_like(mass[:, 0], dtype=torch.int64), V).to(q.dtype))
    drafts = torch.multinomial(q, 1)[:, 0].view(bs, n)
    return Proposal(drafts, q.view(bs, n, V), nonfinite)


class Accepted(NamedTuple):
    accept_len: torch.Tensor  # [bs] int64: drafts kept, 0..k-1
    bonus: torch.Tensor  # [bs] int64
    tokens: torch.Tensor  # [bs, k] int64: d1..d_a, bonus, then padding (the scheduler reads a+1)
    new_seq_lens: torch.Tensor  # [bs] int64: L + a + 1
    p: torch.Tensor | None = None  # [bs, k, V] float32: the target distributions of a sampled step (else None)


def accept(verify_ids: torch.Tensor, logits: torch.Tensor, draft_probs: torch.Tensor | None, seq_lens: torch.Tensor,
           sampling_info) -> Accepted:
    """verify_ids [bs, k], target logits [bs, k, V] float32 (rules applied), the drafts' q [bs, k-1, V] or None
    (all greedy), seq_lens [bs] -> what the step commits."""
    if draft_probs is None:  # all greedy: kernel `greedy_accept`
        greedy = dflash_kernels.get("greedy_accept", logits.device)
        return Accepted(*greedy(verify_ids, logits.argmax(dim=-1), seq_lens))
    bs, k, V = logits.shape
    p = processed_probs(logits.reshape(bs * k, V), *_sampling_tensors(sampling_info, k, V),
                        **_sampling_shortcuts(sampling_info)).view(bs, k, V)
    uniforms = torch.rand(bs, k - 1, device=logits.device)
    exponentials = torch.empty(bs, V, device=logits.device).exponential_()
    sample = dflash_kernels.get("sample_accept", logits.device)  # rejection sampling with the real q
    accept_len, bonus = sample(verify_ids, draft_probs, p, uniforms, exponentials)
    tokens = committed_tokens(verify_ids[:, 1:], accept_len, bonus)  # the layout greedy_accept writes
    return Accepted(accept_len, bonus, tokens, seq_lens.long() + accept_len + 1, p)
