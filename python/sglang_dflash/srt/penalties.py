"""Penalties (frequency, presence, repetition, min_new_tokens) at every block row, counted as SGLang 0.5.23's
non-speculative penalizers count them at that point of the output.

State: the committed output of each request that asks for a penalty, counted on the device (`PenaltyCounts`,
which the worker creates once and passes explicitly). SGLang's own penalizer state is not advanced by
speculative workers (its DFLASH never counts output tokens), so the counts are kept here: held weakly by the
request object (they go when the request goes), rebuilt from the request's output at every prefill (new,
chunked or retracted requests) and advanced by every committed run, without a host sync.

Rule (`apply_penalties`): row j of a block sees the committed counts plus the drafts before it; additive
penalties (frequency, presence, min_new_tokens) first, then the repetition penalty (scaling).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch


def needs_penalty(sp) -> bool:
    return (sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 or sp.repetition_penalty != 1.0
            or sp.min_new_tokens > 0)


def stop_ids(req) -> list[int]:
    """The ids min_new_tokens holds back: SGLang's `BatchedMinNewTokensPenalizer` set."""
    tok = req.tokenizer
    ids = set(req.sampling_params.stop_token_ids or ()) | set(req.eos_token_ids or ())
    if tok is not None:
        ids |= set(getattr(tok, "additional_stop_token_ids", None) or ())
        if getattr(tok, "eos_token_id", None) is not None:
            ids.add(tok.eos_token_id)
    return sorted(i for i in ids if i is not None)


# Per request a [2, V] float32 row pair: [0] how often each token occurs in the committed output, [1] the
# frequency penalty summed once per occurrence, as SGLang's frequency penalizer sums it (adding the same float
# c times is not always c times it, and a tie between two logits can hinge on that last bit).
def _tally(req, tokens: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
    state[0].index_add_(0, tokens, weight)
    state[1].index_add_(0, tokens, weight * req.sampling_params.frequency_penalty)


class PenaltyCounts:
    """The committed-output counts of every penalised request: req -> [2, V] float32 (see `_tally`), held
    weakly by the request. `start` at a prefill, `of` when a step reads them, `commit` after a step."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _fresh(self, req, device) -> torch.Tensor:
        state = torch.zeros(2, self.vocab, dtype=torch.float32, device=device)
        if req.output_ids:
            _tally(req, torch.tensor(req.output_ids, device=device), torch.ones(len(req.output_ids), device=device),
                   state)
        return state

    def start(self, reqs, first_tokens: torch.Tensor) -> None:
        """After a prefill: the state = the request's output so far (non-empty for a retracted request) + the
        token the prefill sampled (first_tokens [bs]). Requests without penalties keep no state. A chunk that is
        not the last samples a token SGLang throws away; the next chunk's prefill rebuilds the state, so that
        token never sticks."""
        for i, req in enumerate(reqs):
            if not needs_penalty(req.sampling_params):
                continue
            state = self._fresh(req, first_tokens.device)
            _tally(req, first_tokens[i:i + 1].long(), torch.ones(1, device=state.device), state)
            self._state[req] = state

    def of(self, req, device) -> torch.Tensor:
        """[2, V] float32: the request's committed counts and summed frequency penalty."""
        state = self._state.get(req)
        if state is None:  # joined without a prefill through this worker (no path we know of does)
            state = self._state[req] = self._fresh(req, device)
        return state

    def commit(self, reqs, tokens: torch.Tensor, accept_len: torch.Tensor) -> None:
        """Advance the state of penalised requests `reqs` by what the step committed: tokens [n, k] of which the
        first accept_len + 1 (drafts kept, then the bonus) count. On the device, no host sync."""
        k = tokens.shape[1]
        keep = (torch.arange(k, device=tokens.device)[None, :] <= accept_len[:, None]).to(torch.float32)
        for i, req in enumerate(reqs):
            _tally(req, tokens[i].long(), keep[i], self._state[req])


class Penalties(NamedTuple):
    """One step's penalised requests, their parameters and committed state on the device."""
    rows: torch.Tensor  # [n] int64: batch rows that ask for a penalty
    reqs: list
    counts: torch.Tensor  # [n, V] committed-output counts
    frequency_sum: torch.Tensor  # [n, V] the frequency penalty summed per committed occurrence
    frequency: torch.Tensor  # [n, 1, 1]
    presence: torch.Tensor
    repetition: torch.Tensor
    min_new: torch.Tensor  # [n, 1] int64
    stop_mask: torch.Tensor  # [n, 1, V] float: -inf at the stop ids, 0 elsewhere


def gather(reqs, counts: PenaltyCounts, device) -> Penalties | None:
    """The penalised requests of a batch (None when there are none)."""
    picked = [(i, r) for i, r in enumerate(reqs) if needs_penalty(r.sampling_params)]
    if not picked:
        return None
    vocab = counts.vocab
    rows = torch.tensor([i for i, _ in picked], dtype=torch.int64, device=device)
    preqs = [r for _, r in picked]
    param = lambda name: torch.tensor([getattr(r.sampling_params, name) for r in preqs],  # noqa: E731
                                      dtype=torch.float32, device=device).view(-1, 1, 1)
    stop_mask = torch.zeros(len(preqs), 1, vocab, dtype=torch.float32, device=device)
    for n, r in enumerate(preqs):
        if r.sampling_params.min_new_tokens > 0:
            ids = [t for t in stop_ids(r) if 0 <= t < vocab]
            stop_mask[n, 0, ids] = float("-inf")
    states = torch.stack([counts.of(r, device) for r in preqs])  # [n, 2, V]
    return Penalties(
        rows=rows, reqs=preqs,
        counts=states[:, 0], frequency_sum=states[:, 1],
        frequency=param("frequency_penalty"), presence=param("presence_penalty"),
        repetition=param("repetition_penalty"),
        min_new=torch.tensor([r.sampling_params.min_new_tokens for r in preqs], device=device).view(-1, 1),
        stop_mask=stop_mask,
    )


def apply_penalties(logits: torch.Tensor, pen: Penalties, block_drafts: torch.Tensor | None) -> None:
    """logits [bs, R, V] in place (R = k verify rows, or k - 1 drafter rows). Row j of a penalised request sees
    its committed counts plus, when `block_drafts` [bs, R-1] is given, drafts 1..j of its block (the verify
    layout); else the committed counts alone (the drafter's rows)."""
    n, V = pen.counts.shape
    R = logits.shape[1]
    counts = pen.counts[:, None, :].expand(n, R, V).clone()  # [n, R, V]
    frequency = pen.frequency_sum[:, None, :].expand(n, R, V).clone()
    if block_drafts is not None and R > 1:
        d = block_drafts[pen.rows][:, None, :].expand(n, R, R - 1)
        upto = (torch.arange(R, device=d.device)[:, None] >= torch.arange(1, R, device=d.device)[None, :])
        upto = upto[None].expand(n, R, R - 1).to(counts.dtype)
        counts.scatter_add_(2, d, upto)
        frequency.scatter_add_(2, d, upto * pen.frequency)
    sub = logits[pen.rows]  # [n, R, V] (a copy; written back below)
    additive = -frequency - pen.presence * (counts > 0).to(counts.dtype)
    held = counts.sum(dim=-1, keepdim=True) < pen.min_new[:, :, None]  # [n, R, 1]: output still too short
    additive = additive + torch.where(held, pen.stop_mask, torch.zeros((), device=sub.device))
    sub = sub + additive
    scale = torch.where(counts > 0, pen.repetition, torch.ones((), device=sub.device))
    sub = torch.where(sub < 0, sub * scale, sub / scale)
    logits[pen.rows] = sub
