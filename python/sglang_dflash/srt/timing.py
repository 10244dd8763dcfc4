"""Where a decode step's time goes (SGLANG_DFLASH_TIMING=1; off by default).

Stages: draft (drafter forward + draft tokens), verify (target forward), accept, commit (drafter context
K/V + result), prefill (prefill batches run between two decode steps, drafter context included), and
scheduler (the rest of the time between two decode steps: batch preparation, slot reservation, result
processing, detokenisation hand-off; a gap over IDLE_GAP_S is an idle server and is not counted). Each
report also names the verify widths the steps ran at ("widths {1: 40, 16: 10}", `adaptive.py`).
With timing on, the device is synchronised at each stage boundary: the split is honest, the step a
little slower than untimed.
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


class StepTimer:
    def __init__(self, enabled: bool, device: str, report_every: int = 50,
                 extra: Callable[[], str] | None = None) -> None:
        self.enabled = enabled
        self.extra = extra  # () -> str appended to each report (the verify widths run), or None
        self.cuda = str(device).startswith("cuda")
        self.report_every = report_every
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.steps = 0
        self._last_end: float | None = None
        self._prefill_since_last = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin_step(self) -> None:
        if not self.enabled:
            return
        now = self._now()
        gap = None if self._last_end is None else now - self._last_end - self._prefill_since_last
        if gap is not None and gap < IDLE_GAP_S:  # a longer gap is an idle server, not overhead
            self.totals["scheduler"] += gap
        self._prefill_since_last = 0.0

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = self._now()
        yield
        dt = self._now() - t0
        self.totals[name] += dt
        if name == "prefill":
            self._prefill_since_last += dt

    def end_step(self) -> None:
        if not self.enabled:
            return
        self._last_end = self._now()
        self.steps += 1
        if self.steps == self.report_every:  # one line per window of `report_every` steps, then start over
            extra = "" if self.extra is None else "; " + self.extra()
            logger.info("sglang-dflash step timing: %s%s", self.summary(), extra)
            self.totals = dict.fromkeys(STAGES, 0.0)
            self.steps = 0

    def summary(self) -> str:
        total = sum(self.totals.values()) or 1.0
        parts = [f"{k} {1000 * v / self.steps:.2f} ms ({100 * v / total:.0f}%)" for k, v in self.totals.items()]
        return f"{self.steps} steps, per step: " + ", ".join(parts)
