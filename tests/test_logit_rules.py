"""The logit rules (`srt/penalties.py`, `srt/grammar.py`, composed by `srt/logit_rules.py`) on synthetic
tensors: every verify row penalised as the non-speculative sampler would at that point of the output (counting
the drafts before it), the committed state advanced by what a step keeps and held by the request, xgrammar
bitmasks unpacked."""

from __future__ import annotations

import gc
import types

import torch
from sampling_check import penalised
from sglang_dflash.srt import grammar, logit_rules, penalties


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
    V, k = 12, 5
    reqs = [_req([4, 4, 7], frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.4, min_new_tokens=6),
            _req([1]),  # no penalty: its rows untouched
            _req([9], repetition_penalty=2.0)]
    first = torch.tensor([5, 6, 5])  # what each prefill sampled
    counts = penalties.PenaltyCounts(V)
    counts.start(reqs, first)
    verify_ids = torch.tensor([[5, 4, 5, 2, 4], [6, 1, 1, 1, 1], [5, 5, 9, 0, 0]])
    logits = torch.randn(3, k, V) * 3
    want = logits.clone()
    pen = penalties.gather(reqs, counts, "cpu")
    penalties.apply_penalties(logits, pen, verify_ids[:, 1:])
    for i, r in enumerate(reqs):
        for j in range(k):
            if penalties.needs_penalty(r.sampling_params):
                output = r.output_ids + [int(first[i])] + verify_ids[i, 1:j + 1].tolist()
                want[i, j] = penalised(want[i, j], output, vars(r.sampling_params), stop_ids=(2, 3))
    assert torch.equal(logits.isinf(), want.isinf())
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert torch.isinf(logits[0, :2, 2]).all() and torch.isfinite(logits[0, 2:, 2]).all()  # min_new_tokens 6


def test_commit_counts_kept_drafts_and_bonus_only():
    V = 8
    req = _req([], frequency_penalty=0.5)
    counts = penalties.PenaltyCounts(V)
    counts.start([req], torch.tensor([1]))
    tokens = torch.tensor([[3, 3, 6, 7]])  # d1 d2 bonus, then padding past accept_len + 1
    counts.commit([req], tokens, torch.tensor([2]))
    state = counts.of(req, "cpu")
    assert state[0].tolist() == [0, 1, 0, 2, 0, 0, 1, 0]
    assert state[1].tolist() == [0, 0.5, 0, 1.0, 0, 0, 0.5, 0]


def test_prefill_rebuilds_state_from_the_output_so_far():
    """A retracted request comes back through a prefill: its state is its output, not zeros."""
    V = 8
    req = _req([2, 2, 5], presence_penalty=1.0)
    counts = penalties.PenaltyCounts(V)
    counts.start([req], torch.tensor([4]))
    assert counts.of(req, "cpu")[0].tolist() == [0, 0, 2, 0, 1, 1, 0, 0]
    counts.commit([req], torch.tensor([[7, 7]]), torch.tensor([1]))
    counts.start([req], torch.tensor([6]))  # a prefill again (retracted): the output so far, not the old state
    assert counts.of(req, "cpu")[0].tolist() == [0, 0, 2, 0, 0, 1, 1, 0]


def test_counts_are_held_by_the_request_and_by_their_owner_only():
    """The state goes with the request (weakly held), only penalised requests keep one, and two owners (two
    workers) do not share it."""
    V = 8
    plain, penalised_req = _req([1]), _req([1], presence_penalty=1.0)
    counts, other = penalties.PenaltyCounts(V), penalties.PenaltyCounts(V)
    counts.start([plain, penalised_req], torch.tensor([2, 3]))
    assert len(counts._state) == 1 and len(other._state) == 0
    assert other.of(penalised_req, "cpu")[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]  # rebuilt from its own output
    del penalised_req
    gc.collect()
    assert len(counts._state) == 0 and len(other._state) == 0


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
    assert torch.equal(grammar.bitmask_allows(packed, V), allowed)
    assert grammar._allowed(packed[0], 31) and not grammar._allowed(packed[0], 30)


def test_block_rules_read_and_advance_the_counts_they_are_given():
    V, k = 10, 3
    info = types.SimpleNamespace(logit_bias=None, has_custom_logit_processor=False)
    plain = types.SimpleNamespace(reqs=[_req([4])], sampling_info=info, has_grammar=False)
    counts = penalties.PenaltyCounts(V)
    assert logit_rules.BlockRules.of(plain, k, V, "cpu", counts) is None  # nothing asked: no rules, no device work
    req = _req([4], presence_penalty=2.0)
    counts.start([req], torch.tensor([5]))
    rules = logit_rules.BlockRules.of(types.SimpleNamespace(reqs=[req], sampling_info=info, has_grammar=False),
                                      k, V, "cpu", counts)
    logits = torch.zeros(1, k, V)
    rules.verify(logits, torch.tensor([[5, 6, 7]]))  # row j sees the output 4, 5 and drafts d_1 .. d_j
    assert [(logits[0, j] == -2).nonzero().flatten().tolist() for j in range(k)] == [[4, 5], [4, 5, 6], [4, 5, 6, 7]]
    rules.commit(torch.tensor([[6, 7, 0]]), torch.tensor([1]))  # d_1 kept, bonus 7, then padding
    assert counts.of(req, "cpu")[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
