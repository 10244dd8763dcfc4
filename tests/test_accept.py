"""The acceptance rule (its one definition: `dflash_kernels.greedy_accept.accept` / `sample_accept.reference`):
hand-worked cases, a naive loop, and the sampling rule's output distribution."""

import torch
from dflash_kernels import greedy_accept as greedy_rule
from dflash_kernels import sample_accept as sample_rule
from sglang_dflash.sampling import SamplingParams, probs_for, processed_probs


def greedy_accept(block, predict):
    return greedy_rule.accept(block, predict)


def sample_accept(block, q, p, uniforms, generator=None):
    """The rule with its bonus race's exponentials drawn from `generator`."""
    e = torch.empty(block.shape[0], p.shape[-1]).exponential_(generator=generator)
    return sample_rule.reference(block, q, p, uniforms, e)


def test_greedy_hand_worked():
    block = torch.tensor([[7, 1, 2, 3], [7, 1, 2, 3], [7, 1, 2, 3], [7, 9, 2, 3]])
    predict = torch.tensor([[1, 2, 3, 4], [1, 2, 8, 4], [5, 2, 3, 4], [1, 2, 3, 4]])
    accept_len, bonus = greedy_accept(block, predict)
    # row 0: all 3 drafts kept, bonus = predict[3] = 4; row 1: 1, 2 kept, 3 != 8 -> bonus 8
    # row 2: first draft 1 != 5 -> 0 kept, bonus 5; row 3: 9 != 1 -> 0 kept (later matches do not count)
    assert accept_len.tolist() == [3, 2, 0, 0]
    assert bonus.tolist() == [4, 8, 5, 1]


def test_greedy_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    for B in (2, 3, 8, 16):
        block = torch.randint(0, 3, (64, B), generator=g)
        predict = torch.randint(0, 3, (64, B), generator=g)
        accept_len, bonus = greedy_accept(block, predict)
        for i in range(64):
            a = 0
            while a < B - 1 and block[i, a + 1] == predict[i, a]:
                a += 1
            assert accept_len[i] == a and bonus[i] == predict[i, a]


def _emitted(block, accept_len, bonus):
    """The tokens one step commits: d1..da then the bonus."""
    return [block[1 : 1 + accept_len].tolist() + [bonus]]


def _first_two_histograms(rule, p, q, n, seed=0):
    """Draw drafts from q, run `rule`, and histogram the first emitted token and, when the first
    draft was kept, the second emitted token."""
    B, V = q.shape[0] + 1, q.shape[1]
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.repeat(n, 1, 1).flatten(0, 1), 1, generator=g).view(n, B - 1)
    block = torch.cat([torch.zeros(n, 1, dtype=torch.int64), drafts], dim=1)
    uniforms = torch.rand(n, B - 1, generator=g)
    accept_len, bonus = rule(block, q.expand(n, -1, -1), p.expand(n, -1, -1), uniforms, g)
    first = torch.where(accept_len >= 1, block[:, 1], bonus)
    second = torch.where(accept_len >= 2, block[:, 2], bonus)[accept_len >= 1]
    return torch.bincount(first, minlength=V).float(), torch.bincount(second, minlength=V).float()


def _wrong_rule_resample_from_p(block, q, p, u, g):
    """The right acceptance test but the bonus drawn from p instead of norm(max(0, p - q)).
    (Treating q as a point mass would NOT be wrong: that rule is lossless too, only less accepting.)"""
    accept_len, _ = sample_accept(block, q, p, u, g)
    p_a = p[torch.arange(len(block)), accept_len]
    return accept_len, torch.multinomial(p_a, 1, generator=g)[:, 0]


def _chi2_pvalue(counts, probs):
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    expected = probs[keep] * counts.sum()
    return chisquare(counts[keep].numpy(), expected.numpy()).pvalue


def test_sampling_rule_preserves_target_distribution():
    """p_0 (first token) and p_1 (second token, given the first draft was kept) are reproduced; the same
    statistic rejects a wrong acceptance rule, so the test has the power to fail."""
    torch.manual_seed(3)
    V, B, n = 6, 3, 60000
    p = torch.softmax(torch.randn(B, V) * 1.5, -1)
    q = torch.softmax(torch.randn(B - 1, V) * 1.5, -1)
    first, second = _first_two_histograms(sample_accept, p, q, n)
    assert _chi2_pvalue(first, p[0]) > 1e-3
    assert _chi2_pvalue(second, p[1]) > 1e-3
    bad_first, _ = _first_two_histograms(_wrong_rule_resample_from_p, p, q, n)
    assert _chi2_pvalue(bad_first, p[0]) < 1e-6


def test_sampling_identical_distributions_accept_everything():
    V, B = 5, 4
    p = torch.softmax(torch.randn(B, V), -1)
    block = torch.tensor([[0, 1, 2, 3]])
    accept_len, _ = sample_accept(block, p[None, :-1], p[None], torch.rand(1, B - 1) * 0.999)
    assert accept_len.tolist() == [3]


def test_sampling_zero_target_prob_always_rejected():
    p = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]])
    q = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    for _ in range(20):
        accept_len, bonus = sample_accept(torch.tensor([[2, 0]]), q, p, torch.rand(1, 1))
        assert accept_len.item() == 0 and bonus.item() in (1, 2)


# --- the processed distribution matches SGLang's plain sampler --------------------------------
def test_processed_probs_matches_sglang_sampler_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    sm = torch.softmax(logits / 0.7, -1)[0]
    # top_k = 2: only the two largest survive
    p = probs_for(logits, SamplingParams(temperature=0.7, top_k=2))[0]
    torch.testing.assert_close(p, torch.tensor([sm[0], sm[1], 0, 0, 0]) / (sm[0] + sm[1]))
    # top_p: keep while the mass BEFORE a token is <= top_p
    top_p = float(sm[0]) + 1e-4
    p = probs_for(logits, SamplingParams(temperature=0.7, top_p=top_p))[0]
    torch.testing.assert_close(p, torch.tensor([sm[0], sm[1], 0, 0, 0]) / (sm[0] + sm[1]))
    # min_p: drop tokens below min_p * max
    p = probs_for(logits, SamplingParams(temperature=0.7, min_p=float(sm[2] / sm[0]) + 1e-4))[0]
    torch.testing.assert_close(p, torch.tensor([sm[0], sm[1], 0, 0, 0]) / (sm[0] + sm[1]))


def test_processed_probs_equals_sglang_function():
    """Our distribution equals the filtered weights SGLang's torch sampler draws from (its own code)."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch as sglang_filter

    torch.manual_seed(0)
    n, V = 16, 50
    logits = torch.randn(n, V) * 3
    temps = torch.rand(n) + 0.3
    top_k = torch.randint(1, V + 1, (n,))
    top_p = torch.rand(n) * 0.8 + 0.2
    min_p = torch.rand(n) * 0.2
    ours = processed_probs(logits, temps, top_k, top_p, min_p)
    probs = torch.softmax(logits / temps[:, None], -1)
    _, weights, order, _ = sglang_filter(probs, top_k, top_p, min_p, True, None, torch.zeros(n, dtype=torch.int64),
                                         return_filtered_probs=True)
    theirs = torch.zeros(n, V).scatter_(1, order.long(), weights)
    theirs = theirs / theirs.sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs)


def test_processed_probs_shortcuts_equal_the_full_sort():
    """SGLang's sampler skips the sort when no row filters, and ranks only max_top_k columns when every row
    has a top-k: both shortcuts give the full computation's distribution."""
    torch.manual_seed(1)
    n, V = 16, 300
    logits = torch.randn(n, V) * 3
    temps = torch.rand(n) + 0.3
    top_k = torch.randint(1, 40, (n,))
    top_p = torch.rand(n) * 0.8 + 0.2
    min_p = torch.rand(n) * 0.2
    full = processed_probs(logits, temps, top_k, top_p, min_p)
    torch.testing.assert_close(processed_probs(logits, temps, top_k, top_p, min_p, max_top_k=int(top_k.max())), full)
    off = (torch.full((n,), V), torch.ones(n), torch.zeros(n))
    plain = processed_probs(logits, temps, *off, filtered=False)
    torch.testing.assert_close(plain, torch.softmax(logits / temps[:, None], -1))
    torch.testing.assert_close(processed_probs(logits, temps, *off), plain, atol=1e-6, rtol=0)
