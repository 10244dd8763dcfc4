"""The step clock: the one place the start of every decode step is read, feeding two consumers.

1. The width chooser's cost model (`adaptive.py`, always): the period from one decode step's start to the
   next's is charged, through the `cost(bs, k, seconds)` callback, to the batch size and width of the step it
   belongs to. A period is skipped when a prefill ran in it (`prefill` clears the record), when the batch size
   changed over it (a request left or joined: the scheduler may have waited for work), or when it is longer than
   IDLE_GAP_S (an idle server). It belongs to the step that started it, except under the overlap scheduler on a
   GPU: there the scheduler launches a step before it waits for the one before, so the period is mostly that
   earlier step's device time and is charged to it (and counted only when the batch size held over both).
2. The timing report (SGLANG_DFLASH_TIMING=1; off by default): the stages draft (drafter forward + draft
   tokens), verify (verify ids, target forward, logit rules), accept, commit (penalty counts, drafter context
   K/V, result), prefill (prefill batches run between two decode steps, drafter context included), and
   scheduler (the rest of the time between the end of one decode step and the start of the next: batch
   preparation, slot reservation, result processing, detokenisation hand-off; a gap over IDLE_GAP_S is an idle
   server and is not counted). One log line per `report_every` steps, which also names the verify widths the
   steps ran at ("widths {1: 40, 16: 10}", from `extra`). With timing on, the device is synchronised at each
   stage boundary: the split is honest, the step a little slower than untimed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

logger = logging.getLogger("sglang_dflash")
IDLE_GAP_S = 0.5
STAGES = ("draft", "verify", "accept", "commit", "prefill", "scheduler")


class StepClock:
    def __init__(self, device: str, cost: Callable[[int, int, float], None], timing: bool = False,
                 report_every: int = 50, extra: Callable[[], str] | None = None,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = str(device).startswith("cuda")
        self.cost = cost  # (bs, k, seconds) of a step period -> the width chooser's cost model
        self.timing = timing
        self.report_every = report_every
        self.extra = extra  # () -> str appended to each timing report (the verify widths run), or None
        self._now = now
        self.overlapped = False  # set by the worker once the scheduler overlaps steps (lagged periods on a GPU)
        self._recent: list[tuple[float, int, int]] = []  # (start, bs, k) of the last two decode steps
        self._running: tuple[float, int] | None = None  # (start, bs) of the decode step running
        self.totals = dict.fromkeys(STAGES, 0.0)  # timing report: seconds per stage in this window
        self.steps = 0
        self._last_end: float | None = None
        self._prefill_since_last = 0.0

    def _read(self) -> float:
        if self.timing and self.cuda:
            torch.cuda.synchronize()  # sync: timing on only (SGLANG_DFLASH_TIMING=1), for an honest split
        return self._now()

    def start_step(self, bs: int) -> None:
        """A decode step of `bs` requests starts: the period since the last start goes to the cost model (under
        the rules above) and the gap since the last end to the timing report."""
        now = self._read()
        recent = self._recent
        if recent and now - recent[-1][0] < IDLE_GAP_S and recent[-1][1] == bs:
            lagged = self.overlapped and self.cuda
            _, run_bs, run_k = recent[0] if lagged else recent[-1]
            if not lagged or (len(recent) == 2 and run_bs == bs):
                self.cost(run_bs, run_k, now - recent[-1][0])
        self._running = (now, bs)
        if not self.timing:
            return
        gap = None if self._last_end is None else now - self._last_end - self._prefill_since_last
        if gap is not None and gap < IDLE_GAP_S:  # a longer gap is an idle server, not overhead
            self.totals["scheduler"] += gap
        self._prefill_since_last = 0.0

    @contextmanager
    def stage(self, name: str):
        if not self.timing:
            yield
            return
        t0 = self._read()
        yield
        dt = self._read() - t0
        self.totals[name] += dt
        if name == "prefill":
            self._prefill_since_last += dt

    @contextmanager
    def prefill(self):
        """A prefill batch: the step period it falls in says nothing about the decode's cost (dropped)."""
        self._recent = []
        with self.stage("prefill"):
            yield

    def end_step(self, k: int) -> None:
        """The decode step started last ran at verify width k."""
        start, bs = self._running
        self._recent = [*self._recent[-1:], (start, bs, k)]
        if not self.timing:
            return
        self._last_end = self._read()
        self.steps += 1
        if self.steps == self.report_every:  # one line per window of `report_every` steps, then start over
            extra = "" if self.extra is None else "; " + self.extra()
            logger.info("sglang-dflash step timing: %s%s", self.summary(), extra)
            self.totals = dict.fromkeys(STAGES, 0.0)
            self.steps = 0

    def summary(self) -> str:
        total = sum(self.totals.values()) or 1.0
        parts = [f"{name} {1000 * secs / self.steps:.2f} ms ({100 * secs / total:.0f}%)"
                 for name, secs in self.totals.items()]
        return f"{self.steps} steps, per step: " + ", ".join(parts)
