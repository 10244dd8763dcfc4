"""The verify-width chooser (`srt/adaptive.py`) on synthetic step costs and acceptance: no server."""

from __future__ import annotations

import random

import pytest
import torch
from sglang_dflash import envs
from sglang_dflash.srt.adaptive import AcceptanceModel, CostModel, WidthChooser, candidate_widths

WIDTHS = [1, 2, 4, 8, 16]


def simulate(step_seconds, alpha: float, bs: int, steps: int = 600, seed: int = 0) -> tuple[WidthChooser, float]:
    """Serve `steps` steps of `bs` requests whose drafts are each accepted with probability `alpha` (given the
    ones before) and whose step at width k takes step_seconds(bs, k) (with 5% noise). -> the chooser and the
    committed tokens per second it achieved over the last half of the steps."""
    rng = random.Random(seed)
    chooser = WidthChooser(WIDTHS)
    tokens = seconds = 0.0
    for step in range(steps):
        k = chooser.choose(bs)
        kept = []
        for _ in range(bs):
            a = 0
            while a < k - 1 and rng.random() < alpha:
                a += 1
            kept.append(a)
        chooser.observe(k, torch.tensor(kept))
        t = step_seconds(bs, k) * (1 + 0.05 * (rng.random() - 0.5))
        chooser.step_time(bs, k, t)
        if step >= steps // 2:
            tokens += sum(kept) + bs
            seconds += t
    return chooser, tokens / seconds


def best_rate(step_seconds, alpha: float, bs: int) -> tuple[int, float]:
    rates = {k: bs * sum(alpha ** j for j in range(k)) / step_seconds(bs, k) for k in WIDTHS}
    best = max(rates, key=rates.get)
    return best, rates[best]


def cpu_like(bs, k):  # every verified token costs (a CPU, or a GPU past saturation); drafting costs too
    return 0.004 + 0.0008 * bs * k + (0.002 + 0.0004 * bs * k if k > 1 else 0.0)


def gpu_like(bs, k):  # a step costs about the same whatever its width (a GPU at small batch)
    return 0.010 + 0.00002 * bs * k + (0.003 if k > 1 else 0.0)


def test_plain_decode_when_verify_is_expensive_and_acceptance_low():
    chooser, rate = simulate(cpu_like, alpha=0.2, bs=32)
    best, want = best_rate(cpu_like, 0.2, 32)
    assert best == 1
    assert chooser.rates(32)[1] == max(chooser.rates(32).values())
    assert rate > 0.93 * want, (rate, want)


def test_full_block_when_verify_is_cheap_and_acceptance_high():
    chooser, rate = simulate(gpu_like, alpha=0.9, bs=4)
    best, want = best_rate(gpu_like, 0.9, 4)
    assert best == 16
    assert max(chooser.rates(4), key=chooser.rates(4).get) == 16
    assert rate > 0.93 * want, (rate, want)


@pytest.mark.parametrize("alpha,bs", [(0.6, 1), (0.6, 8), (0.75, 16), (0.5, 64)])
def test_close_to_the_best_width_in_between(alpha, bs):
    """Wherever the optimum lies, the steps served reach 90% of the best fixed width's rate (probes included)."""
    _, rate = simulate(cpu_like, alpha=alpha, bs=bs)
    _, want = best_rate(cpu_like, alpha, bs)
    assert rate > 0.9 * want, (alpha, bs, rate, want)


def test_follows_a_change_of_load():
    """From 1 request (speculation pays) to 64 (it does not): the chooser moves to plain decode."""
    chooser, _ = simulate(cpu_like, alpha=0.9, bs=1)
    assert max(chooser.rates(1), key=chooser.rates(1).get) == best_rate(cpu_like, 0.9, 1)[0] > 1
    for _ in range(200):
        k = chooser.choose(64)
        chooser.observe(k, torch.full((64,), min(k - 1, 1)))
        chooser.step_time(64, k, cpu_like(64, k))
    counts = [chooser.choose(64) for _ in range(32)]
    assert counts.count(1) >= 28, counts  # the rest are probes of width 2


def test_expected_tokens_is_the_chain_of_acceptance_rates():
    model = AcceptanceModel(16, prior_accepted=0.0, prior_reached=1e-9)
    # 10 requests at width 8: kept 0,1,...,7 drafts (and two more kept 7)
    model.observe(8, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 7]))
    alpha = [model.alpha(i) for i in range(1, 8)]
    assert alpha[0] == pytest.approx(9 / 10) and alpha[6] == pytest.approx(3 / 4)
    want, chain = 1.0, 1.0
    for a in alpha[:3]:
        chain *= a
        want += chain
    assert model.expected_tokens(4) == pytest.approx(want)
    # the chain telescopes: E[min(kept, 3)] + 1 over the observed requests
    assert model.expected_tokens(4) == pytest.approx(sum(min(a, 3) + 1 for a in [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]) / 10)
    assert model.expected_tokens(1) == 1.0


def test_cost_model_fits_a_line_and_falls_back_to_the_mean():
    cost = CostModel([1, 16], decay=1.0)
    for bs in (1, 4, 16, 64):
        cost.observe(16, bs, 0.01 + 0.001 * bs)
    assert cost.predict(16, 32) == pytest.approx(0.042)
    for _ in range(3):
        cost.observe(1, 8, 0.02)
    assert cost.predict(1, 100) == pytest.approx(0.02)  # one batch size seen: its mean
    assert CostModel([1]).predict(1, 4) is None


def test_cost_model_is_robust_to_stalls_and_noise():
    """A stall counts for at most 3x the estimate; a line fitted on noisy steps of nearby batch sizes does not
    promise a nearly free step far away (never below a quarter of the mean)."""
    cost = CostModel([4], decay=1.0)
    for _ in range(5):
        cost.observe(4, 8, 0.01)
    cost.observe(4, 8, 5.0)  # the scheduler waited, or a kernel compiled
    assert cost.predict(4, 8) == pytest.approx((5 * 0.01 + 0.03) / 6)
    noisy = CostModel([4], decay=1.0)
    for bs, t in [(30, 0.020), (31, 0.030), (32, 0.021), (33, 0.035)]:
        noisy.observe(4, bs, t)
    assert noisy.predict(4, 1) >= 0.25 * (0.020 + 0.030 + 0.021 + 0.035) / 4


def test_modes_and_widths():
    assert candidate_widths(16) == WIDTHS
    assert candidate_widths(6) == [1, 2, 4, 6]
    assert candidate_widths(16, [4]) == [4]
    with pytest.raises(ValueError, match=r"\[32\] out of range: expected 1..16"):
        candidate_widths(16, [2, 32])
    with pytest.raises(ValueError, match="no verify widths given"):
        candidate_widths(16, [])
    fixed = WidthChooser(WIDTHS, "fixed")
    assert {fixed.choose(8) for _ in range(20)} == {16}
    cycle = WidthChooser(WIDTHS, "cycle")
    assert [cycle.choose(8) for _ in range(6)] == [1, 2, 4, 8, 16, 1]
    for k in [1, 2, 4, 8, 16, 1]:
        cycle.ran(k)
    assert cycle.summary() == "widths {1: 2, 2: 1, 4: 1, 8: 1, 16: 1}"
    forced = WidthChooser([2])
    assert {forced.choose(8) for _ in range(5)} == {2}
    with pytest.raises(ValueError, match="expected adaptive, fixed or cycle"):
        WidthChooser(WIDTHS, "greedy")


def test_environment_flags(monkeypatch):
    for value, mode in (("", "adaptive"), ("1", "adaptive"), ("on", "adaptive"), ("0", "fixed"), ("off", "fixed"),
                        ("fixed", "fixed"), ("cycle", "cycle")):
        monkeypatch.setenv("SGLANG_DFLASH_ADAPTIVE", value)
        assert envs.width_mode() == mode
    monkeypatch.setenv("SGLANG_DFLASH_ADAPTIVE", "sometimes")
    with pytest.raises(ValueError, match="SGLANG_DFLASH_ADAPTIVE='sometimes'"):
        envs.width_mode()
    monkeypatch.setenv("SGLANG_DFLASH_VERIFY_WIDTHS", "1, 4,16")
    assert envs.verify_widths() == [1, 4, 16]
    monkeypatch.setenv("SGLANG_DFLASH_VERIFY_WIDTHS", "1,x")
    with pytest.raises(ValueError, match="expected comma-separated integers"):
        envs.verify_widths()
    monkeypatch.delenv("SGLANG_DFLASH_VERIFY_WIDTHS")
    assert envs.verify_widths() is None
