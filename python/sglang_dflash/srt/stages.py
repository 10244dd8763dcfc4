"""The stages of one SGLang decode step, as functions of tensors and SGLang's batch objects.

    block_layout -> propose (draft tokens) -> verify_ids -> accept (tokens to commit, new lengths)

The acceptance rule itself is defined once in `dflash_kernels` (greedy_accept.accept / sample_accept.reference,
and the commit layout greedy_accept.committed_tokens); `accept` here picks the kernel or its reference.
The drafter's context write (target hidden states -> drafter K/V) is `context.ContextWriter`.

Shapes: `bs` requests, `B` the step's verify width (the block size, or less when `adaptive.py` picks a smaller
width), `V` vocab, `H` hidden, `K*H` concatenated target features.
"""

from __future__ import annotations

from typing import NamedTuple

import dflash_kernels
import torch
import torch.nn.functional as F
from dflash_kernels.greedy_accept import committed_tokens

from ..sampling import processed_probs


class BlockLayout(NamedTuple):
    ids: torch.Tensor  # [bs, B] int64: [bonus, MASK, ..., MASK]
    positions: torch.Tensor  # [bs, B] int64: L_i + j
    slots: torch.Tensor  # [bs, B] int64: KV slot ids req_to_token[row_i, L_i + j]


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


def set_block_key_lengths(batch, B: int) -> None:
    """The host lengths a block forward's attention metadata reads: L + B keys per request (context, then the
    block). SGLang 0.5.23's own DFLASH does the same: FlashInfer's CUDA-graph replay plan builds its key
    offsets from `seq_lens_cpu`, which must then match the device offsets (L + B); the device `seq_lens`
    stay L, since FA3 and triton add B themselves. Host tensors and ints only (no sync); the scheduler
    restores both fields after the step. Under overlap scheduling SGLang leaves `seq_lens_cpu` unset for backends
    that declare they need no host lengths (FA3): then both stay as they are."""
    if batch.seq_lens_cpu is None:
        return
    batch.seq_lens_cpu = batch.seq_lens_cpu + B
    batch.seq_lens_sum = batch.seq_lens_sum + B * batch.seq_lens_cpu.shape[0]


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
    """draft_logits [bs, B-1, V] -> the drafts.

    Sampling requests draw each draft from the drafter's own distribution, processed with the request's
    temperature / top-k / top-p / min-p, so acceptance can use the real q (not a point mass). A broken
    drafter (NaN / inf logits) may only cost acceptance: greedy drafts are then some valid id the target
    rejects, and a q row with no finite mass becomes a point mass on token 0 (any q the draft is really
    drawn from keeps rejection sampling exact)."""
    # one reduction over the logits (no [bs, B-1, V] temporary): any NaN or inf makes its row's sum non-finite
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
    accept_len: torch.Tensor  # [bs] int64: drafts kept, 0..B-1
    bonus: torch.Tensor  # [bs] int64
    tokens: torch.Tensor  # [bs, B] int64: d1..d_a, bonus, then padding (the scheduler reads a+1)
    new_seq_lens: torch.Tensor  # [bs] int64: L + a + 1
    p: torch.Tensor | None = None  # [bs, B, V] float32: the target distributions of a sampled step (else None)


def accept(verify_ids: torch.Tensor, logits: torch.Tensor, draft_probs: torch.Tensor | None, seq_lens: torch.Tensor,
           sampling_info) -> Accepted:
    """verify_ids [bs, B], target logits [bs, B, V] -> what the step commits."""
    if draft_probs is None:  # all greedy: kernel `greedy_accept`
        greedy = dflash_kernels.get("greedy_accept", logits.device)
        return Accepted(*greedy(verify_ids, logits.argmax(dim=-1), seq_lens))
    bs, B, V = logits.shape
    p = processed_probs(logits.reshape(bs * B, V), *_sampling_tensors(sampling_info, B, V),
                        **_sampling_shortcuts(sampling_info)).view(bs, B, V)
    uniforms = torch.rand(bs, B - 1, device=logits.device)
    exponentials = torch.empty(bs, V, device=logits.device).exponential_()
    sample = dflash_kernels.get("sample_accept", logits.device)  # rejection sampling with the real q
    accept_len, bonus = sample(verify_ids, draft_probs, p, uniforms, exponentials)
    tokens = committed_tokens(verify_ids[:, 1:], accept_len, bonus)  # the layout greedy_accept writes
    return Accepted(accept_len, bonus, tokens, seq_lens.long() + accept_len + 1, p)


def sampling_masks(sampling_info, acc: Accepted):
    """return_sampling_mask rows (SGLang's `SamplingMaskOutput`) for the committed tokens of the requests that
    ask: the support of the distribution each token was drawn from (`acc.p`: top-k, top-p and min-p applied
    jointly, after penalties and grammar), at most the largest asked top_k ids per token, and the logprobs of
    the token and of the support; a greedy step (p None) has the token itself as its support, logprob 0."""
    from sglang.srt.layers.logits_processor import SamplingMaskOutput, SamplingMaskStatus

    rows = sampling_info.sampling_mask_batch_indices
    tokens = acc.tokens.index_select(0, rows)  # [n, B]
    support_rows = sampling_info.sampling_support_logprobs_capture_indices  # rows of `tokens` wanting support
    if acc.p is None:
        ids, lengths = tokens[..., None].to(torch.int32), torch.ones_like(tokens, dtype=torch.int32)
        selected = torch.zeros_like(tokens, dtype=torch.float32)
        support = None if support_rows is None else selected.index_select(0, support_rows)[..., None]
    else:
        p = acc.p.index_select(0, rows)  # [n, B, V]
        probs, ids = p.topk(min(max(sampling_info.sampling_mask_top_ks), p.shape[-1]), dim=-1)
        ids, lengths = ids.to(torch.int32), (probs > 0).sum(dim=-1, dtype=torch.int32)
        selected = p.gather(-1, tokens[..., None]).squeeze(-1).log()
        support = None if support_rows is None else probs.index_select(0, support_rows).log()
    statuses = torch.where(torch.isfinite(selected), int(SamplingMaskStatus.OK), int(SamplingMaskStatus.INVALID))
    return SamplingMaskOutput(token_ids=ids, lengths=lengths, selected_logprobs=selected, support_logprobs=support,
                              statuses=statuses.to(torch.int8),
                              num_accept_tokens=(acc.accept_len + 1).index_select(0, rows))


def returned_hidden_states(batch, logits_output, server_mode) -> torch.Tensor | None:
    """What a prefill hands SGLang as `hidden_states` for return_hidden_states: the target's final hidden
    states (kept beside the drafter's captured layers, hooks.keep_final_hidden_states), every extend token's
    for the FULL mode SGLang's result processor then slices per request, each request's last for LAST; None
    when no request asks (the captured layers are the worker's, never returned)."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

    final = logits_output.last_hidden_states
    if final is None or server_mode == CaptureHiddenMode.NULL or not any(r.return_hidden_states for r in batch.reqs):
        return None
    if max(batch.return_hidden_states_mode, server_mode).is_full():
        return final
    last = torch.tensor(batch.extend_lens, device=final.device).cumsum(0) - 1
    return final[last]


def spec_logprobs(batch, logits_output, logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Logprobs of every committed token (and top-k / asked-for ids) into `logits_output`, from the processed
    verify rows `logits` [bs, B, V] the tokens were accepted under: the distribution SGLang's plain sampler
    reports (log-softmax of the logits after penalties, grammar, bias and custom processors; divided by the
    temperature unless the batch is all greedy). SGLang's `compute_spec_logprobs` does the work on the chain
    layout: row j of request i <-> committed token (i, j); the scheduler keeps the first accept_len + 1."""
    from sglang.srt.layers.logprob_processor import compute_spec_logprobs

    bs, B, V = logits.shape
    logits_output.next_token_logits = logits.view(bs * B, V)
    compute_spec_logprobs(batch, logits_output, tokens.reshape(-1), chain_stride=B)
    logits_output.next_token_logits = None


def rehearse_sampled_step(bs: int, B: int, vocab: int, device) -> Accepted:
    """One sampled step's distributions and acceptance at batch `bs` on zero logits, with top-p 0.95 in every
    request: the full-vocabulary sort, the largest temporaries a step makes (q over bs*(B-1) rows, p over bs*B
    rows). The worker runs it at start on a GPU to measure that peak (`DFlashWorker.prewarm_sampling`)."""
    import types

    full = lambda value, dtype=torch.float32: torch.full((bs,), value, dtype=dtype, device=device)  # noqa: E731
    info = types.SimpleNamespace(is_all_greedy=False, temperatures=full(1.0)[:, None], top_ks=full(vocab, torch.int32),
                                 top_ps=full(0.95), min_ps=full(0.0), need_top_k_sampling=False,
                                 need_top_p_sampling=True, need_min_p_sampling=False, max_top_k=None)
    proposal = propose(torch.zeros(bs, B - 1, vocab, device=device), info)
    verify = torch.cat([torch.zeros(bs, 1, dtype=torch.int64, device=device), proposal.drafts], dim=1)
    logits = torch.zeros(bs, B, vocab, device=device)
    return accept(verify, logits, proposal.q, torch.zeros(bs, dtype=torch.int64, device=device), info)
