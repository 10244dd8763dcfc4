"""Constrained decoding along a drafted chain: the grammar mask of every block row, as SGLang 0.5.23's
non-speculative sampler would see it at that point of the output.

Verify row j of a block predicts the token after [anchor, d_1 .. d_j], so its mask is the grammar's after also
accepting d_1 .. d_j. The drafts of a grammar request are drawn under those masks, position by position
(`ChainGrammar.constrain`), so none is one the grammar refuses; the matchers are rolled back after. Under the
overlap scheduler the worker calls SGLang's grammar barrier before a step reads any matcher.

The mask is xgrammar's packed int32 bitmask, kept on the host; the chain walk reads it and the drafts on the
host (one read per drafted position of a grammar request): grammar batches only.
"""

from __future__ import annotations

import torch


def grammar_reqs(reqs) -> list[tuple[int, object]]:
    out = []
    for i, r in enumerate(reqs):
        g = getattr(r, "grammar", None)
        if g is not None and not g.finished and not g.is_terminated():
            out.append((i, g))
    return out


def bitmask_allows(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [n, ceil(V/32)] -> bool [n, V] (bit t of word t // 32 set = allowed)."""
    bits = (mask[:, :, None].to(torch.int64) >> torch.arange(32, device=mask.device)) & 1
    return bits.view(mask.shape[0], -1)[:, :vocab].bool()


def _allowed(mask_row: torch.Tensor, token: int) -> bool:
    return (int(mask_row[token // 32]) >> (token % 32)) & 1 == 1  # sync: none, the mask lives on the host


class ChainGrammar:
    """Per-position grammar masks along each request's drafted chain (k rows per request, k the step's verify
    width): row 0 from the grammar's state now (the committed output), row j after also accepting d_1 .. d_j;
    the matcher is rolled back to where it was. `constrain` draws the drafts under those masks, position by
    position (so every draft is one the grammar allows), filling the masks as it goes; `walk` fills them along
    drafts drawn without the grammar. Either stops after a draft that terminates the grammar (SGLang's
    scheduler drops whatever follows it), and the walk at the first draft the grammar refuses (it has
    probability 0 at the row before it, so it is rejected and nothing after it is read). Rows left unfilled
    allow every token. The caller has run SGLang's grammar barrier first (overlap scheduling)."""

    def __init__(self, reqs, k: int, vocab: int, device) -> None:
        self.picked = grammar_reqs(reqs)
        self.k, self.vocab, self.device = k, vocab, device
        self.mask = None  # [bs*k, ceil(V/32)] int32 on the host
        self.constrained = False
        if not self.picked:
            return
        g0 = self.picked[0][1]
        self.mask = g0.allocate_vocab_mask(vocab_size=vocab, batch_size=len(reqs) * k, device="cpu")
        for i, g in self.picked:
            g.fill_vocab_mask(self.mask, i * k)

    def constrain(self, drafts: torch.Tensor, q: torch.Tensor | None, draft_logits: torch.Tensor) -> None:
        """Redraw the drafts [bs, k-1] of grammar requests in place, d_(j+1) under verify row j's mask: greedy
        the best allowed token of `draft_logits` [bs, k-1, V]; sampled from q [bs, k-1, V] restricted to the
        allowed tokens and renormalised, written back into q (the distribution each draft really comes from,
        which acceptance needs; where the drafter put no mass on an allowed token, its best allowed one). One
        host read per drafted position of a grammar request."""
        if self.mask is None:
            return
        k, V = self.k, self.vocab
        for i, g in self.picked:
            walked = 0
            for j in range(k - 1):
                allowed = bitmask_allows(self.mask[i * k + j: i * k + j + 1].to(self.device), V)[0]
                best = int(draft_logits[i, j].masked_fill(~allowed, float("-inf")).argmax())  # sync: grammar only
                if q is None:
                    t = best
                else:
                    row = q[i, j] * allowed
                    mass = row.sum()
                    row = row / mass if bool(mass > 0) else torch.nn.functional.one_hot(  # sync: grammar only
                        torch.tensor(best, device=row.device), V).to(row.dtype)
                    q[i, j] = row
                    t = int(torch.multinomial(row, 1))  # sync: grammar only, the draft steers the matcher
                drafts[i, j] = t
                if not _allowed(self.mask[i * k + j], t):  # only a drafter with NaN logits gets here
                    break
                g.accept_token(t)
                walked += 1
                if g.is_terminated():
                    break
                g.fill_vocab_mask(self.mask, i * k + j + 1)
            if walked:
                g.rollback(walked)
        self.constrained = True

    def walk(self, verify_ids: torch.Tensor) -> torch.Tensor | None:
        """verify_ids [bs, k] -> bool [bs, k, V] allowed tokens per verify row."""
        if self.mask is None:
            return None
        k = self.k
        if self.constrained:  # the masks were filled along these very drafts
            return bitmask_allows(self.mask.to(self.device), self.vocab).view(-1, k, self.vocab)
        ids = verify_ids.tolist()  # sync: one host read, for grammar batches only
        for i, g in self.picked:
            walked = 0
            for j in range(1, k):
                t = ids[i][j]
                if not _allowed(self.mask[i * k + j - 1], t):
                    break
                g.accept_token(t)
                walked += 1
                if g.is_terminated():
                    break
                g.fill_vocab_mask(self.mask, i * k + j)
            if walked:
                g.rollback(walked)
        return bitmask_allows(self.mask.to(self.device), self.vocab).view(-1, k, self.vocab)
