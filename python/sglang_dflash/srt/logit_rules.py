"""A request's logit rules (penalties, min_new_tokens, grammar, logit_bias, custom processors) at every block
position, exactly as SGLang 0.5.23's non-speculative sampler would apply them at that point of the output.

Verify row j of a block predicts the token after [anchor, d_1 .. d_j]. Without speculation that token is
sampled after the output has grown by d_1 .. d_j, so row j must see them: penalties count them, min_new_tokens
counts them, the grammar has accepted them. SGLang's own DFLASH applies one per-request penalty to all k rows
(it never counts the block's own drafts); here each row gets its own. The order is SGLang's
(`SamplingBatchInfo.apply_logits_bias`, then the sampler's custom processors):

    additive penalties (frequency, presence, min_new_tokens)  ->  repetition penalty (scaling)
    ->  grammar mask  ->  logit_bias  ->  custom logit processors

The rules themselves live apart: penalties and their per-request state in `penalties.py` (the state is the
worker's `PenaltyCounts`, passed in), the grammar chain in `grammar.py`; `BlockRules` composes them for one step.

The drafter's proposal gets the same rules where they are cheap (the committed-state penalties, logit_bias) or
pay most (grammar: drafts redrawn position by position under the grammar, so none is one it refuses): any
distribution the drafts are really drawn from keeps acceptance exact, a closer one only raises acceptance.
"""

from __future__ import annotations

import torch

from .grammar import ChainGrammar
from .penalties import PenaltyCounts, apply_penalties, gather, needs_penalty


class BlockRules:
    """The rules of one decode step's batch at verify width k; `of` returns None when no request in it has any,
    so a plain batch pays one pass over its requests and nothing on the device. Under the overlap scheduler the
    caller runs SGLang's grammar barrier before `of` (the grammar matchers are read here)."""

    def __init__(self, batch, k: int, vocab: int, device, counts: PenaltyCounts) -> None:
        reqs = batch.reqs
        info = batch.sampling_info
        self.reqs, self.k, self.vocab = reqs, k, vocab
        self.counts = counts
        self.penalties = gather(reqs, counts, device)
        self.grammar = ChainGrammar(reqs, k, vocab, device) if batch.has_grammar else None
        self.logit_bias = getattr(info, "logit_bias", None)
        self.info = info if info.has_custom_logit_processor else None

    @classmethod
    def of(cls, batch, k: int, vocab: int, device, counts: PenaltyCounts) -> BlockRules | None:
        info = batch.sampling_info
        if (batch.has_grammar or getattr(info, "logit_bias", None) is not None or info.has_custom_logit_processor
                or any(needs_penalty(r.sampling_params) for r in batch.reqs)):
            return cls(batch, k, vocab, device, counts)
        return None

    def draft(self, draft_logits: torch.Tensor) -> None:
        """The drafter's logits [bs, k-1, V], in place: committed-state penalties, logit_bias."""
        if self.penalties is not None:
            apply_penalties(draft_logits, self.penalties, None)
        if self.logit_bias is not None:
            draft_logits.add_(self.logit_bias[:, None, :])

    def constrain(self, drafts: torch.Tensor, q: torch.Tensor | None, draft_logits: torch.Tensor) -> None:
        """Drafts of grammar requests redrawn under their grammar (`ChainGrammar.constrain`)."""
        if self.grammar is not None:
            self.grammar.constrain(drafts, q, draft_logits)

    def verify(self, logits: torch.Tensor, verify_ids: torch.Tensor) -> None:
        """The target's verify logits [bs, k, V], in place: every row as the non-speculative sampler would see
        it after the drafts before it."""
        if self.penalties is not None:
            apply_penalties(logits, self.penalties, verify_ids[:, 1:])
        if self.grammar is not None:
            allowed = self.grammar.walk(verify_ids)
            if allowed is not None:
                logits.masked_fill_(~allowed, float("-inf"))
        if self.logit_bias is not None:
            logits.add_(self.logit_bias[:, None, :])
        if self.info is not None:
            from .sglang_api import apply_custom_logit_processor

            flat = logits.view(-1, logits.shape[-1])
            apply_custom_logit_processor(flat, self.info, num_tokens_in_batch=self.k)

    def commit(self, tokens: torch.Tensor, accept_len: torch.Tensor) -> None:
        """tokens [bs, k], accept_len [bs]: the penalised requests' counts advanced by what the step committed."""
        if self.penalties is not None:
            self.counts.commit(self.penalties.reqs, tokens[self.penalties.rows], accept_len[self.penalties.rows])
