"""What a step hands SGLang beside its tokens, for the requests that ask: the target's final hidden states
(return_hidden_states), logprobs (return_logprob, top-k and asked-for ids) and sampling masks
(return_sampling_mask). Each is read from the same processed verify rows the tokens were accepted under, so it
is what SGLang's plain sampler would report.

Shapes: `bs` requests, `k` the step's verify width, `V` vocab, `H` hidden; `num_tokens` the tokens of an extend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .stages import Accepted

if TYPE_CHECKING:
    from .sglang_api import LogitsProcessorOutput
    from .step import Step


def decode_outputs(batch, step: Step, server_mode) -> LogitsProcessorOutput:
    """A decode step's `logits_output`: hidden states (row j of request i <-> committed token (i, j)), logprobs
    and sampling masks, each only when the batch asks for it; the tokens themselves go in the result."""
    from .sglang_api import CaptureHiddenMode, LogitsProcessorOutput

    out = LogitsProcessorOutput(next_token_logits=None, hidden_states=None)
    if server_mode != CaptureHiddenMode.NULL and any(r.return_hidden_states for r in batch.reqs):
        out.hidden_states = step.final_hidden  # [bs*k, H]
    if batch.return_logprob:  # from the same processed verify rows the tokens were accepted under
        spec_logprobs(batch, out, step.logits, step.accepted.tokens)
    if batch.sampling_info.sampling_mask_batch_indices is not None:  # return_sampling_mask
        out.sampling_mask_output = sampling_masks(batch.sampling_info, step.accepted)
    return out


def returned_hidden_states(batch, logits_output, server_mode) -> torch.Tensor | None:
    """What a prefill hands SGLang as `hidden_states` for return_hidden_states: the target's final hidden
    states (kept beside the drafter's captured layers, hooks.keep_final_hidden_states), every extend token's
    [num_tokens, H] for the FULL mode SGLang's result processor then slices per request, each request's last
    [bs, H] for LAST; None when no request asks (the captured layers are the worker's, never returned)."""
    from .sglang_api import CaptureHiddenMode

    final = logits_output.last_hidden_states
    if final is None or server_mode == CaptureHiddenMode.NULL or not any(r.return_hidden_states for r in batch.reqs):
        return None
    if max(batch.return_hidden_states_mode, server_mode).is_full():
        return final
    last = torch.tensor(batch.extend_lens, device=final.device).cumsum(0) - 1
    return final[last]


def spec_logprobs(batch, logits_output, logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Logprobs of every committed token (and top-k / asked-for ids) into `logits_output`, from the processed
    verify rows `logits` [bs, k, V] the tokens [bs, k] were accepted under: the distribution SGLang's plain
    sampler reports (log-softmax of the logits after penalties, grammar, bias and custom processors; divided by
    the temperature unless the batch is all greedy). SGLang's `compute_spec_logprobs` does the work on the chain
    layout: row j of request i <-> committed token (i, j); the scheduler keeps the first accept_len + 1."""
    from .sglang_api import compute_spec_logprobs

    bs, k, V = logits.shape
    logits_output.next_token_logits = logits.view(bs * k, V)
    compute_spec_logprobs(batch, logits_output, tokens.reshape(-1), chain_stride=k)
    logits_output.next_token_logits = None


def sampling_masks(sampling_info, acc: Accepted):
    """return_sampling_mask rows (SGLang's `SamplingMaskOutput`) for the committed tokens of the requests that
    ask: the support of the distribution each token was drawn from (`acc.p`: top-k, top-p and min-p applied
    jointly, after penalties and grammar), at most the largest asked top_k ids per token, and the logprobs of
    the token and of the support; a greedy step (p None) has the token itself as its support, logprob 0."""
    from .sglang_api import SamplingMaskOutput, SamplingMaskStatus

    rows = sampling_info.sampling_mask_batch_indices
    tokens = acc.tokens.index_select(0, rows)  # [n, k]
    support_rows = sampling_info.sampling_support_logprobs_capture_indices  # rows of `tokens` wanting support
    if acc.p is None:
        ids, lengths = tokens[..., None].to(torch.int32), torch.ones_like(tokens, dtype=torch.int32)
        selected = torch.zeros_like(tokens, dtype=torch.float32)
        support = None if support_rows is None else selected.index_select(0, support_rows)[..., None]
    else:
        p = acc.p.index_select(0, rows)  # [n, k, V]
        probs, ids = p.topk(min(max(sampling_info.sampling_mask_top_ks), p.shape[-1]), dim=-1)
        ids, lengths = ids.to(torch.int32), (probs > 0).sum(dim=-1, dtype=torch.int32)
        selected = p.gather(-1, tokens[..., None]).squeeze(-1).log()
        support = None if support_rows is None else probs.index_select(0, support_rows).log()
    ok, invalid = int(SamplingMaskStatus.OK), int(SamplingMaskStatus.INVALID)  # host: enum values
    statuses = torch.where(torch.isfinite(selected), ok, invalid)
    return SamplingMaskOutput(token_ids=ids, lengths=lengths, selected_logprobs=selected, support_logprobs=support,
                              statuses=statuses.to(torch.int8),
                              num_accept_tokens=(acc.accept_len + 1).index_select(0, rows))
