"""A request's logit rules (penalties, min_new_tokens, grammar, logit_bias, custom processors) at every block
position, exactly as SGLang 0.5.23's non-speculative sampler would apply them at that point of the output.

Verify row j of a block predicts the token after [anchor, d_1 .. d_j]. Without speculation that token is
sampled after the output has grown by d_1 .. d_j, so row j must see them: penalties count them, min_new_tokens
counts them, the grammar has accepted them. SGLang's own DFLASH applies one per-request penalty to all B rows
(it never counts the block's own drafts); here each row gets its own. The order is SGLang's
(`SamplingBatchInfo.apply_logits_bias`, then the sampler's custom processors):

    additive penalties (frequency, presence, min_new_tokens)  ->  repetition penalty (scaling)
    ->  grammar mask  ->  logit_bias  ->  custom logit processors

Penalty state: the committed output tokens of each request, counted on the device (a [V] float row per
request that asks for a penalty, held weakly by the request object, so it goes when the request goes). SGLang's
own penalizer state is not advanced by speculative workers (its DFLASH never counts output tokens), so the
counts are kept here: rebuilt from the request's output at every prefill (new or retracted requests), and
advanced by every committed run.

The drafter's proposal gets the same rules where they are cheap (the committed-state penalties, logit_bias) or
pay most (grammar: drafts redrawn position by position under the grammar, so none is one it refuses): any
distribution the drafts are really drawn from keeps acceptance exact, a closer one only raises acceptance.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

_counts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # req -> [2, V] float32 (see _tally)


def needs_penalty(sp) -> bool:
    return (sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 or sp.repetition_penalty != 1.0
            or sp.min_new_tokens > 0)


def stop_ids(req) -> list[int]:
    """The ids min_new_tokens holds back: SGLang's `BatchedMinNewTokensPenalizer` set."""
    tok = req.tokenizer
    ids = set(req.sampling_params.stop_token_ids or ()) | set(req.eos_token_ids or ())
    if tok is not None:
        ids |= set(getattr(tok, "additional_stop_token_ids", None) or ())
        if getattr(tok, "eos_token_id", None) is not None:
            ids.add(tok.eos_token_id)
    return sorted(i for i in ids if i is not None)


# -- penalty state ------------------------------------------------------------------------------
# Per request a [2, V] float32 row pair: [0] how often each token occurs in the committed output, [1] the
# frequency penalty summed once per occurrence, as SGLang's frequency penalizer sums it (adding the same float
# c times is not always c times it, and a tie between two logits can hinge on that last bit).
def _tally(req, tokens: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> None:
    state[0].index_add_(0, tokens, weight)
    state[1].index_add_(0, tokens, weight * req.sampling_params.frequency_penalty)


def _fresh_state(req, vocab: int, device) -> torch.Tensor:
    state = torch.zeros(2, vocab, dtype=torch.float32, device=device)
    if req.output_ids:
        _tally(req, torch.tensor(req.output_ids, device=device), torch.ones(len(req.output_ids), device=device),
               state)
    return state


def start_counts(reqs, first_tokens: torch.Tensor, vocab: int) -> None:
    """After a prefill: the state = the request's output so far (non-empty for a retracted request) + the
    token the prefill sampled. Requests without penalties keep no state. A chunk that is not the last samples
    a token SGLang throws away; the next chunk's prefill rebuilds the state, so that token never sticks."""
    for i, req in enumerate(reqs):
        if not needs_penalty(req.sampling_params):
            continue
        state = _fresh_state(req, vocab, first_tokens.device)
        _tally(req, first_tokens[i:i + 1].long(), torch.ones(1, device=state.device), state)
        _counts[req] = state


def committed_counts(req, vocab: int, device) -> torch.Tensor:
    state = _counts.get(req)
    if state is None:  # joined without a prefill through this worker (no path we know of does)
        state = _counts[req] = _fresh_state(req, vocab, device)
    return state


class _Penalties(NamedTuple):
    rows: torch.Tensor  # [n] int64: batch rows that ask for a penalty
    reqs: list
    counts: torch.Tensor  # [n, V] committed-output counts
    frequency_sum: torch.Tensor  # [n, V] the frequency penalty summed per committed occurrence
    frequency: torch.Tensor  # [n, 1, 1]
    presence: torch.Tensor
    repetition: torch.Tensor
    min_new: torch.Tensor  # [n, 1] int64
    stop_mask: torch.Tensor  # [n, 1, V] float: -inf at the stop ids, 0 elsewhere


def _penalties(reqs, vocab: int, device) -> _Penalties | None:
    picked = [(i, r) for i, r in enumerate(reqs) if needs_penalty(r.sampling_params)]
    if not picked:
        return None
    rows = torch.tensor([i for i, _ in picked], dtype=torch.int64, device=device)
    preqs = [r for _, r in picked]
    param = lambda name: torch.tensor([getattr(r.sampling_params, name) for r in preqs],  # noqa: E731
                                      dtype=torch.float32, device=device).view(-1, 1, 1)
    stop_mask = torch.zeros(len(preqs), 1, vocab, dtype=torch.float32, device=device)
    for k, r in enumerate(preqs):
        if r.sampling_params.min_new_tokens > 0:
            ids = [t for t in stop_ids(r) if 0 <= t < vocab]
            stop_mask[k, 0, ids] = float("-inf")
    states = torch.stack([committed_counts(r, vocab, device) for r in preqs])  # [n, 2, V]
    return _Penalties(
        rows=rows, reqs=preqs,
        counts=states[:, 0], frequency_sum=states[:, 1],
        frequency=param("frequency_penalty"), presence=param("presence_penalty"),
        repetition=param("repetition_penalty"),
        min_new=torch.tensor([r.sampling_params.min_new_tokens for r in preqs], device=device).view(-1, 1),
        stop_mask=stop_mask,
    )


def apply_penalties(logits: torch.Tensor, pen: _Penalties, block_drafts: torch.Tensor | None) -> None:
    """logits [bs, R, V] in place. Row j of a penalised request sees its committed counts plus, when
    `block_drafts` [bs, R-1] is given, drafts 1..j of its block (the verify layout); else the committed
    counts alone (the drafter's rows)."""
    n, V = pen.counts.shape
    R = logits.shape[1]
    counts = pen.counts[:, None, :].expand(n, R, V).clone()  # [n, R, V]
    frequency = pen.frequency_sum[:, None, :].expand(n, R, V).clone()
    if block_drafts is not None and R > 1:
        d = block_drafts[pen.rows][:, None, :].expand(n, R, R - 1)
        upto = (torch.arange(R, device=d.device)[:, None] >= torch.arange(1, R, device=d.device)[None, :])
        upto = upto[None].expand(n, R, R - 1).to(counts.dtype)
        counts.scatter_add_(2, d, upto)
        frequency.scatter_add_(2, d, upto * pen.frequency)
    sub = logits[pen.rows]  # [n, R, V] (a copy; written back below)
    additive = -frequency - pen.presence * (counts > 0).to(counts.dtype)
    held = counts.sum(dim=-1, keepdim=True) < pen.min_new[:, :, None]  # [n, R, 1]: output still too short
    additive = additive + torch.where(held, pen.stop_mask, torch.zeros((), device=sub.device))
    sub = sub + additive
    scale = torch.where(counts > 0, pen.repetition, torch.ones((), device=sub.device))
    sub = torch.where(sub < 0, sub * scale, sub / scale)
    logits[pen.rows] = sub


def commit(reqs, tokens: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Advance the state of penalised requests `reqs` by what the step committed: tokens [n, B] of which the
    first accept_len + 1 (drafts kept, then the bonus) count. On the device, no host sync."""
    B = tokens.shape[1]
    keep = (torch.arange(B, device=tokens.device)[None, :] <= accept_len[:, None]).to(torch.float32)
    for i, req in enumerate(reqs):
        _tally(req, tokens[i].long(), keep[i], _counts[req])


# -- grammar --------------------------------------------------------------------------------------
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
    return (int(mask_row[token // 32]) >> (token % 32)) & 1 == 1


class ChainGrammar:
    """Per-position grammar masks along each request's drafted chain: row 0 from the grammar's state now (the
    committed output), row j after also accepting d_1 .. d_j; the matcher is rolled back to where it was.
    `constrain` draws the drafts under those masks, position by position (so every draft is one the grammar
    allows), filling the masks as it goes; `walk` fills them along drafts drawn without the grammar. Either
    stops after a draft that terminates the grammar (SGLang's scheduler drops whatever follows it), and the
    walk at the first draft the grammar refuses (it has probability 0 at the row before it, so it is rejected
    and nothing after it is read). Rows left unfilled allow every token."""

    def __init__(self, reqs, B: int, vocab: int, device, barrier=None) -> None:
        if barrier is not None:  # overlap scheduling: the previous step's tokens enter the matchers first
            barrier()
        self.picked = grammar_reqs(reqs)
        self.B, self.vocab, self.device = B, vocab, device
        self.mask = None
        self.constrained = False
        if not self.picked:
            return
        g0 = self.picked[0][1]
        self.mask = g0.allocate_vocab_mask(vocab_size=vocab, batch_size=len(reqs) * B, device="cpu")
        for i, g in self.picked:
            g.fill_vocab_mask(self.mask, i * B)

    def constrain(self, drafts: torch.Tensor, q: torch.Tensor | None, draft_logits: torch.Tensor) -> None:
        """Redraw the drafts [bs, B-1] of grammar requests in place, d_(j+1) under verify row j's mask: greedy
        the best allowed token of `draft_logits` [bs, B-1, V]; sampled from q [bs, B-1, V] restricted to the
        allowed tokens and renormalised, written back into q (the distribution each draft really comes from,
        which acceptance needs; where the drafter put no mass on an allowed token, its best allowed one). One
        host read per drafted position of a grammar request."""
        if self.mask is None:
            return
        B, V = self.B, self.vocab
        for i, g in self.picked:
            walked = 0
            for j in range(B - 1):
                allowed = bitmask_allows(self.mask[i * B + j: i * B + j + 1].to(self.device), V)[0]
                best = int(draft_logits[i, j].masked_fill(~allowed, float("-inf")).argmax())
                if q is None:
                    t = best
                else:
                    row = q[i, j] * allowed
                    mass = row.sum()
                    row = row / mass if bool(mass > 0) else torch.nn.functional.one_hot(
                        torch.tensor(best, device=row.device), V).to(row.dtype)
                    q[i, j] = row
                    t = int(torch.multinomial(row, 1))
                drafts[i, j] = t
                if not _allowed(self.mask[i * B + j], t):  # only a drafter with NaN logits gets here
                    break
                g.accept_token(t)
                walked += 1
                if g.is_terminated():
                    break
                g.fill_vocab_mask(self.mask, i * B + j + 1)
            if walked:
                g.rollback(walked)
        self.constrained = True

    def walk(self, verify_ids: torch.Tensor) -> torch.Tensor | None:
        """verify_ids [bs, B] -> bool [bs, B, V] allowed tokens per verify row."""
        if self.mask is None:
            return None
        B = self.B
        if self.constrained:  # the masks were filled along these very drafts
            return bitmask_allows(self.mask.to(self.device), self.vocab).view(-1, B, self.vocab)
        ids = verify_ids.tolist()  # one host read, for grammar batches only
        for i, g in self.picked:
            walked = 0
            for j in range(1, B):
                t = ids[i][j]
                if not _allowed(self.mask[i * B + j - 1], t):
                    break
                g.accept_token(t)
                walked += 1
                if g.is_terminated():
                    break
                g.fill_vocab_mask(self.mask, i * B + j)
            if walked:
                g.rollback(walked)
        return bitmask_allows(self.mask.to(self.device), self.vocab).view(-1, B, self.vocab)


# -- one step ---------------------------------------------------------------------------------------
class BlockRules:
    """The rules of one decode step's batch; `of` returns None when no request in it has any, so a plain
    batch pays one pass over its requests and nothing on the device."""

    def __init__(self, batch, B: int, vocab: int, device, barrier=None) -> None:
        reqs = batch.reqs
        info = batch.sampling_info
        self.reqs, self.B, self.vocab = reqs, B, vocab
        self.penalties = _penalties(reqs, vocab, device)
        self.grammar = ChainGrammar(reqs, B, vocab, device, barrier) if batch.has_grammar else None
        self.logit_bias = getattr(info, "logit_bias", None)
        self.info = info if info.has_custom_logit_processor else None

    @classmethod
    def of(cls, batch, B: int, vocab: int, device, barrier=None) -> BlockRules | None:
        info = batch.sampling_info
        if (batch.has_grammar or getattr(info, "logit_bias", None) is not None or info.has_custom_logit_processor
                or any(needs_penalty(r.sampling_params) for r in batch.reqs)):
            return cls(batch, B, vocab, device, barrier)
        if barrier is not None:
            barrier()
        return None

    def draft(self, draft_logits: torch.Tensor) -> None:
        """The drafter's logits [bs, B-1, V], in place: committed-state penalties, logit_bias."""
        if self.penalties is not None:
            apply_penalties(draft_logits, self.penalties, None)
        if self.logit_bias is not None:
            draft_logits.add_(self.logit_bias[:, None, :])

    def constrain(self, drafts: torch.Tensor, q: torch.Tensor | None, draft_logits: torch.Tensor) -> None:
        """Drafts of grammar requests redrawn under their grammar (`ChainGrammar.constrain`)."""
        if self.grammar is not None:
            self.grammar.constrain(drafts, q, draft_logits)

    def verify(self, logits: torch.Tensor, verify_ids: torch.Tensor) -> None:
        """The target's verify logits [bs, B, V], in place: every row as the non-speculative sampler would see
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
            from sglang.srt.layers.sampler import apply_custom_logit_processor

            flat = logits.view(-1, logits.shape[-1])
            apply_custom_logit_processor(flat, self.info, num_tokens_in_batch=self.B)

    def commit(self, tokens: torch.Tensor, accept_len: torch.Tensor) -> None:
        if self.penalties is not None:
            commit(self.penalties.reqs, tokens[self.penalties.rows], accept_len[self.penalties.rows])
