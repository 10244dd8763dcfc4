"""`srt/logit_rules.py` on synthetic tensors: every verify row penalised as the non-speculative sampler would
at that point of the output (counting the drafts before it), the committed state advanced by what a step
keeps, xgrammar bitmasks unpacked, and the request check refusing only what is not served."""

from __future__ import annotations

import types

import pytest
import torch
from sampling_check import penalised
from sglang_dflash.srt import logit_rules
from sglang_dflash.srt.requests import unsupported_reason


class _Req(types.SimpleNamespace):  # weak-referenceable, as SGLang's Req
    __hash__ = object.__hash__


def _req(output_ids=(), **sp):
    params = dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0,
                  stop_token_ids=None)
    params.update(sp)
    tok = types.SimpleNamespace(additional_stop_token_ids=None, eos_token_id=2)
    return _Req(sampling_params=types.SimpleNamespace(**params), output_ids=list(output_ids),
                                 eos_token_ids={3}, tokenizer=tok,
                return_hidden_states=False)


def test_each_verify_row_counts_the_drafts_before_it():
    torch.manual_seed(0)
    V, B = 12, 5
    reqs = [_req([4, 4, 7], frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.4, min_new_tokens=6),
            _req([1]),  # no penalty: its rows untouched
            _req([9], repetition_penalty=2.0)]
    first = torch.tensor([5, 6, 5])  # what each prefill sampled
    logit_rules.start_counts(reqs, first, V)
    verify_ids = torch.tensor([[5, 4, 5, 2, 4], [6, 1, 1, 1, 1], [5, 5, 9, 0, 0]])
    logits = torch.randn(3, B, V) * 3
    want = logits.clone()
    pen = logit_rules._penalties(reqs, V, "cpu")
    logit_rules.apply_penalties(logits, pen, verify_ids[:, 1:])
    for i, r in enumerate(reqs):
        for j in range(B):
            if logit_rules.needs_penalty(r.sampling_params):
                output = r.output_ids + [int(first[i])] + verify_ids[i, 1:j + 1].tolist()
                want[i, j] = penalised(want[i, j], output, vars(r.sampling_params), stop_ids=(2, 3))
    assert torch.equal(logits.isinf(), want.isinf())
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert torch.isinf(logits[0, :2, 2]).all() and torch.isfinite(logits[0, 2:, 2]).all()  # min_new_tokens 6


def test_commit_counts_kept_drafts_and_bonus_only():
    V = 8
    req = _req([], frequency_penalty=0.5)
    logit_rules.start_counts([req], torch.tensor([1]), V)
    tokens = torch.tensor([[3, 3, 6, 7]])  # d1 d2 bonus, then padding past accept_len + 1
    logit_rules.commit([req], tokens, torch.tensor([2]))
    state = logit_rules.committed_counts(req, V, "cpu")
    assert state[0].tolist() == [0, 1, 0, 2, 0, 0, 1, 0]
    assert state[1].tolist() == [0, 0.5, 0, 1.0, 0, 0, 0.5, 0]


def test_prefill_rebuilds_state_from_the_output_so_far():
    """A retracted request comes back through a prefill: its state is its output, not zeros."""
    V = 8
    req = _req([2, 2, 5], presence_penalty=1.0)
    logit_rules.start_counts([req], torch.tensor([4]), V)
    assert logit_rules.committed_counts(req, V, "cpu")[0].tolist() == [0, 0, 2, 0, 1, 1, 0, 0]


def test_bitmask_unpacks_like_xgrammar():
    V = 70
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[0, [0, 31, 32, 63, 69]] = True
    allowed[1] = True
    words = torch.zeros(2, 3, dtype=torch.int64)
    for r in range(2):
        for t in allowed[r].nonzero().flatten().tolist():
            words[r, t // 32] |= 1 << (t % 32)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # int32 words, as xgrammar's
    assert torch.equal(logit_rules.bitmask_allows(packed, V), allowed)
    assert logit_rules._allowed(packed[0], 31) and not logit_rules._allowed(packed[0], 30)


@pytest.mark.parametrize("field, value", [("frequency_penalty", 0.5), ("presence_penalty", 0.5),
                                          ("repetition_penalty", 1.2), ("min_new_tokens", 3)])
def test_requests_with_penalties_are_served(field, value):
    req = _req(**{field: value})
    req.return_logprob, req.custom_logit_processor = True, "x"
    assert unsupported_reason(req) is None


def test_return_hidden_states_served():
    req = _req()
    req.return_hidden_states = True
    assert unsupported_reason(req) is None
