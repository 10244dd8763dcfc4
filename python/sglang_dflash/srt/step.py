"""The record of one decode step: what each stage of `DFlashWorker._decode` leaves for the next.

    plan (k, block, rules) -> draft (proposal) -> verify (verify_ids, logits, target_hidden, final_hidden)
    -> accept (accepted) -> commit

Shapes: `bs` requests, `k` the step's verify width (1 <= k <= B, the block size), `V` vocab, `H` hidden,
`K*H` the target's captured layers concatenated. Tensors a stage has not filled yet are None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .logit_rules import BlockRules
    from .stages import Accepted, BlockLayout, Proposal


@dataclass
class Step:
    k: int  # the verify width: tokens per request the target checks (the anchor, then k - 1 drafts)
    seq_lens: torch.Tensor  # [bs] int64: committed lengths L (the block forwards rebind the batch's field)
    block: BlockLayout  # [bs, k] ids [bonus, MASK..], positions L + j, KV slots of each request's block
    rules: BlockRules | None  # the batch's logit rules; None when no request asks for any
    proposal: Proposal | None = None  # drafts [bs, k-1], their q [bs, k-1, V] or None, nonfinite flags [bs]
    draft_graph: bool = True  # the drafter's forward replayed a CUDA graph (no forward at k = 1)
    verify_ids: torch.Tensor | None = None  # [bs, k] int64: [anchor, d_1 .. d_(k-1)]
    logits: torch.Tensor | None = None  # [bs, k, V] float32: the target's verify logits, rules applied
    target_hidden: torch.Tensor | None = None  # [bs*k, K*H]: the captured layers, next the drafter's context
    final_hidden: torch.Tensor | None = None  # [bs*k, H]: the target's final hidden states, None unless kept
    verify_graph: bool = False  # the target's verify replayed a CUDA graph
    accepted: Accepted | None = None  # accept_len, bonus, tokens [bs, k], new_seq_lens, p

    @property
    def bs(self) -> int:
        return self.block.ids.shape[0]
