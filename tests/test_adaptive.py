"""The verify-width chooser (`srt/adaptive.py`) on synthetic step costs and acceptance, and the step clock that
times its steps (`srt/timing.py`) on a hand-set time: no server."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from sglang_dflash import envs
from sglang_dflash.srt.adaptive import AcceptanceModel, CostModel, WidthChooser, candidate_widths
from sglang_dflash.srt.timing import StepClock

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


class _HandClock:
    """A StepClock on a hand-set time, recording the periods it charges the cost model as (bs, k, seconds)."""

    def __init__(self, device: str = "cpu", **kwargs) -> None:
        self.t = 0.0
        self.charged: list[tuple[int, int, float]] = []
        self.clock = StepClock(device, cost=lambda bs, k, s: self.charged.append((bs, k, round(s, 6))),
                               now=lambda: self.t, **kwargs)

    def steps(self, *steps: tuple[float, int, int]) -> list[tuple[int, int, float]]:
        """Decode steps (start time, bs, k) -> what they charged."""
        self.charged = []
        for start, bs, k in steps:
            self.t = start
            self.clock.start_step(bs)
            self.clock.end_step(k)
        return self.charged


def test_clock_charges_each_period_to_the_step_that_started_it():
    """Start to start, to the earlier step's (bs, k); skipped over a batch-size change, an idle gap, a prefill."""
    hand = _HandClock()
    assert hand.steps((0.0, 4, 16), (0.1, 4, 8), (0.25, 4, 1)) == [(4, 16, 0.1), (4, 8, 0.15)]
    assert hand.steps((0.3, 5, 2), (0.4, 5, 4)) == [(5, 2, 0.1)]  # 4 -> 5 requests: that period not counted
    assert hand.steps((1.0, 5, 8), (1.1, 5, 8)) == [(5, 8, 0.1)]  # 0.6 s since 0.4: an idle server
    with hand.clock.prefill():
        pass
    assert hand.steps((1.2, 5, 2), (1.3, 5, 4)) == [(5, 2, 0.1)]  # the period with the prefill in it: dropped
    hand.clock.overlapped = True  # overlap on CPU: the step's own time is still its period
    assert hand.steps((1.4, 5, 16)) == [(5, 4, 0.1)]


def test_clock_charges_the_step_before_under_overlap_on_a_gpu():
    """The overlap scheduler on a GPU launches a step before it waits for the one before: a period is mostly that
    earlier step's device time, so it goes to it, and counts only when the batch held over both periods."""
    hand = _HandClock("cuda")  # timing off: the clock never touches the device
    hand.clock.overlapped = True
    assert hand.steps((0.0, 4, 16), (0.1, 4, 8), (0.25, 4, 1)) == [(4, 16, 0.15)]
    assert hand.steps((0.3, 5, 2), (0.4, 5, 4), (0.5, 5, 8)) == [(5, 2, 0.1)]  # not 4's step at 0.25, nor 5's 0.3


def test_clock_timing_report_splits_stages_and_scheduler(caplog):
    """With timing on, each stage's time and the scheduler's (end of one decode step to the start of the next,
    prefills taken out) are reported per step, with the chooser's widths."""
    hand = _HandClock(timing=True, report_every=2, extra=lambda: "widths {16: 2}")
    clock = hand.clock
    with caplog.at_level(logging.INFO, logger="sglang_dflash"):
        hand.t = 0.0
        clock.start_step(4)
        with clock.stage("draft"):
            hand.t = 0.01
        hand.t = 0.02
        clock.end_step(16)
        hand.t = 0.03
        with clock.prefill():
            hand.t = 0.05
        hand.t = 0.07
        clock.start_step(4)
        with clock.stage("verify"):
            hand.t = 0.1
        clock.end_step(16)
    line = [r.getMessage() for r in caplog.records if "step timing" in r.getMessage()]
    assert line == ["sglang-dflash step timing: 2 steps, per step: draft 5.00 ms (11%), verify 15.00 ms (33%), "
                    "accept 0.00 ms (0%), commit 0.00 ms (0%), prefill 10.00 ms (22%), scheduler 15.00 ms (33%); "
                    "widths {16: 2}"]
    assert hand.charged == []  # 0.07 s start to start, but a prefill ran in it
