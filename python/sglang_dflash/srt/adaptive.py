"""The verify width of every decode step, chosen from measured step cost and acceptance.

A step at width k drafts a block of k tokens (the anchor, then k - 1 masks) and the target verifies those k
tokens per request; it commits between 1 and k tokens. Width 1 is a plain target decode: no drafter forward,
and the target's hidden states of the anchor still go into the drafter's context, so speculation can resume at
any later step with nothing to rebuild. The candidate widths are 1, the powers of two below the block size B,
and B. For the current batch of `bs` requests the chooser takes the width with the most expected committed
tokens per second:

    rate(k)  = E[tokens | k] / T(bs, k)
    E[tokens | k] = 1 + sum_{j=1..k-1} prod_{i=1..j} alpha_i
        alpha_i = P(draft i accepted | drafts 1..i-1 accepted), counted over the recent steps of every width
        that verified draft i (`AcceptanceModel`)
    T(bs, k) = seconds from the start of a step at width k to the start of the next decode step (the whole
        period: drafter, verify, accept, commit and the scheduler's own work), a least-squares line in bs per
        width over the recent steps (`CostModel`), the periods measured by `timing.StepClock`; a period with a
        prefill in it, or after which the batch changed (a request left or joined: the scheduler may have waited
        for work), is not counted, and one more than 3x the width's estimate counts as 3x (a stall, a first-use
        compilation)

Nothing is calibrated per machine: both models start empty and learn while serving. The first step runs the
full block; a width whose cost is unknown and that neighbours the best one is tried at the next step, and each
neighbour of the best (one width down, one up) is tried again every PROBE_EVERY * r^2 steps, r being how many
times better the best's estimated rate is (at most MAX_PROBE_RATIO): the estimates follow the load, and a probe
(which costs about r - 1 steps' worth of tokens) stays cheap however bad the neighbour.

Modes (`SGLANG_DFLASH_ADAPTIVE`, see `envs.py`): "adaptive" (default), "fixed" (always the largest width),
"cycle" (the widths in turn, step by step: a test mode that exercises every width and every switch).
"""

from __future__ import annotations

import torch

PROBE_EVERY = 16
MAX_PROBE_RATIO = 4.0  # probes of a neighbour 4x (or more) worse than the best come every 16 * 16 steps


def candidate_widths(block_size: int, allowed: list[int] | None = None) -> list[int]:
    """1, the powers of two below `block_size`, and `block_size`; restricted to `allowed` when given (each
    must lie in 1..block_size: ValueError naming the value otherwise)."""
    widths = sorted({w for w in (1, 2, 4, 8, 16, 32, 64) if w < block_size} | {block_size})
    if allowed is None:
        return widths
    bad = [w for w in allowed if not 1 <= w <= block_size]
    if not allowed:
        raise ValueError(f"sglang-dflash: no verify widths given: expected some of 1..{block_size}")
    if bad:
        raise ValueError(f"sglang-dflash: verify widths {bad} out of range: expected 1..{block_size} "
                         f"(the block size)")
    return sorted(set(allowed))


class AcceptanceModel:
    """alpha_i for drafts i = 1..B-1 from the accepted lengths of recent steps, exponentially forgotten.

    A step at width k shows, for each request, whether draft i was reached (drafts 1..i-1 accepted) and then
    accepted, for i < k; positions a step did not verify keep their last estimate."""

    def __init__(self, block_size: int, decay: float = 0.95, prior_accepted: float = 0.5,
                 prior_reached: float = 1.0) -> None:
        self.decay = decay
        self.prior = (prior_accepted, prior_reached)
        self.reached = [0.0] * block_size  # index i: draft i (index 0 unused)
        self.accepted = [0.0] * block_size

    def observe(self, width: int, accept_len: torch.Tensor) -> None:
        """accept_len [bs] (host tensor): drafts kept by each request in a step at `width`."""
        if width < 2 or accept_len.numel() == 0:
            return
        counts = torch.bincount(accept_len.long().clamp(0, width - 1), minlength=width)
        # tail[j] = requests that kept at least j drafts: draft i was reached by tail[i-1], accepted by tail[i]
        tail = counts.flip(0).cumsum(0).flip(0).tolist()  # sync: a host tensor (the caller copied it)
        for i in range(1, width):
            self.reached[i] = self.decay * self.reached[i] + tail[i - 1]
            self.accepted[i] = self.decay * self.accepted[i] + tail[i]

    def alpha(self, i: int) -> float:
        a0, r0 = self.prior
        return (self.accepted[i] + a0) / (self.reached[i] + r0)

    def expected_tokens(self, width: int) -> float:
        """E[tokens committed by one request in a step at `width`]."""
        return self.expected_tokens_table(width)[width]

    def expected_tokens_table(self, max_width: int) -> list[float]:
        """[_, E[tokens | 1], ..., E[tokens | max_width]] in one pass over the chain."""
        table, total, chain = [0.0, 1.0], 1.0, 1.0
        for i in range(1, max_width):
            chain *= self.alpha(i)
            total += chain
            table.append(total)
        return table


class CostModel:
    """Step seconds as a function of the batch size, per width: weighted least squares over recent steps
    (each new step of a width multiplies the weight of its older ones by `decay`). With all its steps at about
    one batch size a width's estimate is their mean; a fitted slope is never negative, a line whose intercept
    would be negative goes through the origin instead, and no estimate falls below a quarter of the mean (a
    line fitted on noise must not promise a nearly free step far from the batch sizes seen). An observation
    counts for at most OUTLIER times the width's estimate."""

    OUTLIER = 3.0

    def __init__(self, widths: list[int], decay: float = 0.9) -> None:
        self.decay = decay
        self.sums = {w: [0.0] * 5 for w in widths}  # weight, sum x, sum y, sum x^2, sum x*y

    def observe(self, width: int, bs: int, seconds: float) -> None:
        estimate = self.predict(width, bs)
        if estimate is not None:
            seconds = min(seconds, self.OUTLIER * estimate)
        s = self.sums[width]
        for n, value in enumerate((1.0, bs, seconds, bs * bs, bs * seconds)):
            s[n] = self.decay * s[n] + value

    def known(self, width: int) -> bool:
        return self.sums[width][0] > 0

    def predict(self, width: int, bs: int) -> float | None:
        w, sx, sy, sxx, sxy = self.sums[width]
        if w <= 0:
            return None
        mx, my = sx / w, sy / w
        spread = sxx - w * mx * mx  # weighted sum of squared deviations of bs
        if spread < 1.0:  # all at about one batch size
            return my
        slope = max(0.0, (sxy - w * mx * my) / spread)
        intercept = my - slope * mx
        if intercept < 0:  # through the origin
            slope, intercept = sxy / sxx, 0.0
        return max(intercept + slope * bs, 0.25 * my)


class WidthChooser:
    """The verify width of each step (see the module docstring). `choose(bs)` before a step, `ran(width)` with
    the width the step runs (under TP rank 0's), `observe(width, accept_len)` with its acceptance,
    `step_time(bs, width, seconds)` with its period (`timing.StepClock` decides which periods count and whose
    they are)."""

    def __init__(self, widths: list[int], mode: str = "adaptive", probe_every: int = PROBE_EVERY) -> None:
        if mode not in ("adaptive", "fixed", "cycle"):
            raise ValueError(f"sglang-dflash: width mode {mode!r}, expected adaptive, fixed or cycle")
        self.widths = sorted(widths)
        self.mode = mode
        self.probe_every = probe_every
        self.acceptance = AcceptanceModel(max(self.widths))
        self.cost = CostModel(self.widths)
        self.steps = 0
        self._last_probe: dict[int, int] = {}  # width -> the step it was last tried at as a probe
        self._pending: list[tuple[int, torch.Tensor, object]] = []  # (width, host accept_len, copy event)
        self.counts = dict.fromkeys(self.widths, 0)  # steps run at each width (timing log, tests)

    def rates(self, bs: int) -> dict[int, float]:
        """Expected committed tokens per second per request at each width whose cost is known."""
        out, expected = {}, self.acceptance.expected_tokens_table(self.widths[-1])
        for w in self.widths:
            t = self.cost.predict(w, bs)
            if t is not None:
                out[w] = expected[w] / t
        return out

    def choose(self, bs: int) -> int:
        self._fold_ready()
        self.steps += 1
        if self.mode == "fixed" or len(self.widths) == 1:
            width = self.widths[-1]
        elif self.mode == "cycle":
            width = self.widths[(self.steps - 1) % len(self.widths)]
        else:
            width = self._adaptive(bs)
        return width

    def ran(self, width: int) -> None:
        self.counts[width] += 1

    def _adaptive(self, bs: int) -> int:
        rates = self.rates(bs)
        if not rates:
            return self.widths[-1]
        best = max(rates, key=rates.get)
        i = self.widths.index(best)
        neighbours = [self.widths[j] for j in (i - 1, i + 1) if 0 <= j < len(self.widths)]
        unknown = [w for w in neighbours if not self.cost.known(w)]
        if unknown:
            self._last_probe[unknown[0]] = self.steps
            return unknown[0]
        for w in neighbours:  # a probe costs about (ratio - 1) steps: the worse a neighbour, the rarer its probe
            ratio = min(rates[best] / rates[w], MAX_PROBE_RATIO)
            if self.steps - self._last_probe.get(w, 0) >= self.probe_every * ratio * ratio:
                self._last_probe[w] = self.steps
                return w
        return best

    def observe(self, width: int, accept_len: torch.Tensor) -> None:
        """The drafts each request kept in a step at `width` (a device tensor: copied to the host without
        waiting; folded in at a later `choose` once the copy has landed)."""
        if width < 2 or self.mode != "adaptive":
            return
        if accept_len.device.type == "cuda":
            host = torch.empty(accept_len.shape, dtype=accept_len.dtype, pin_memory=True)
            host.copy_(accept_len, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((width, host, event))
        else:  # the host already (CPU); another device waits for its step here
            self.acceptance.observe(width, accept_len.cpu())  # sync: none on CPU

    def _fold_ready(self) -> None:
        while self._pending and (self._pending[0][2].query() or len(self._pending) > 8):
            width, host, event = self._pending.pop(0)
            event.synchronize()  # sync: only when 8 copies are still in flight (a stalled stream)
            self.acceptance.observe(width, host)

    def step_time(self, bs: int, width: int, seconds: float) -> None:
        if self.mode == "adaptive":
            self.cost.observe(width, bs, seconds)

    def summary(self) -> str:
        """'widths {1: 40, 16: 10}': steps per width since the last summary (then reset)."""
        text = "widths {" + ", ".join(f"{w}: {n}" for w, n in self.counts.items() if n) + "}"
        self.counts = dict.fromkeys(self.widths, 0)
        return text
