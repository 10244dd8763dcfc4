"""A broken drafter is reported, once per request, without a host sync in the step.

Drafter logits with NaN or inf (a corrupted checkpoint, an fp16 overflow) cost acceptance only (see
`stages.propose`), so the server keeps serving exact output; this tells the operator why acceptance fell.
The step's [bs] flags are copied to host memory without blocking and read at a later step, once the copy
has landed (the scheduler has read that step's results by then).
"""

from __future__ import annotations

import logging
import weakref
from collections import deque

import torch

logger = logging.getLogger("sglang_dflash")


class DraftHealth:
    def __init__(self, max_pending: int = 4) -> None:
        self._warned: weakref.WeakSet = weakref.WeakSet()  # SGLang Req objects already reported
        self._pending: deque = deque(maxlen=max_pending)  # (reqs, host flags [bs] bool, cuda event or None)

    def watch(self, reqs: list, nonfinite: torch.Tensor | None) -> None:
        """reqs: the batch's requests in row order; nonfinite [bs] bool on the device (None: nothing was
        drafted this step)."""
        self._report_landed()
        if nonfinite is None:
            return
        if nonfinite.is_cuda:
            host = torch.empty(nonfinite.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(nonfinite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = nonfinite, None
        self._pending.append((list(reqs), host, event))

    def _report_landed(self) -> None:
        while self._pending and (self._pending[0][2] is None or self._pending[0][2].query()):
            reqs, host, _ = self._pending.popleft()
            flags = host.tolist()  # sync: none, host memory whose copy has landed
            for req, bad in zip(reqs, flags):
                if bad and req not in self._warned:
                    self._warned.add(req)
                    logger.warning("sglang-dflash: request %s: the drafter's logits are not finite (NaN or inf); "
                                   "its drafts are rejected and its output is unchanged, but speculation gains "
                                   "nothing (a corrupted drafter checkpoint, or an fp16 overflow?)", req.rid)
