"""Per-request checks for a DFLASH server.

1. `admit_input` (in SGLang's tokenizer manager, before a request reaches the scheduler): input that would
   crash a forward, and with it every request in flight, is either served exactly or refused with an HTTP 400
   naming the bad value and the valid range. Seen on a plain SGLang 0.5.23 server (no speculation, bundled
   target): an out-of-vocabulary or negative prompt id, top_k=2**40 (an int32 overflow), and an
   out-of-vocabulary stop id in a request with min_new_tokens (a scatter out of bounds) each kill the server.
   Served exactly: stop ids outside the vocabulary are dropped (no generated token can equal one), a top_k
   past int32 becomes -1 (off: any top_k >= the vocabulary keeps every token). Refused: prompt ids outside
   the vocabulary; and, read in SGLang's code though not run, top_logprobs_num above the vocabulary (a topk
   past it) and input_embeds rows of the wrong width.
2. `validate_request` (in the scheduler, in place of its DFLASH request check): the same vocabulary check
   again on the ids the scheduler got (a backstop for paths that skip the tokenizer manager, e.g. extra
   tokenizer worker processes); a request it fails is aborted with HTTP 400 and the server keeps serving.
   Nothing else is refused per request: every request feature SGLang serves without speculation is served
   (logprobs, penalties, min_new_tokens, logit_bias, custom logit processors, constrained decoding, hidden
   states, n > 1).
"""

from __future__ import annotations

from typing import Any

INT32_MAX = 2**31 - 1


def _first_outside(ids, vocab: int) -> tuple[int, Any] | None:
    """(position, value) of the first id that is not an int in [0, vocab), or None."""
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            return i, t
    return None


def input_ids_error(ids, vocab: int, what: str = "input_ids") -> str | None:
    if ids is not None and len(ids) == 0:
        return f"{what} is empty; expected at least one token id"
    bad = _first_outside(ids or (), vocab)
    if bad is not None:
        return (f"{what} holds token id {bad[1]!r} at position {bad[0]}, outside the vocabulary; "
                f"valid ids are [0, {vocab})")
    return None


def admit_input(obj, input_ids, vocab: int, hidden_size: int) -> None:
    """One generate sub-request as SGLang's tokenizer manager validates it: rewrites what can be served exactly
    (in `obj.sampling_params`), raises ValueError (HTTP 400) on input that would crash a forward."""
    multimodal = any(getattr(obj, k, None) for k in ("image_data", "video_data", "audio_data"))
    embeds = getattr(obj, "input_embeds", None)
    errors = []
    if embeds is not None:
        rows = embeds[0] if embeds and isinstance(embeds[0], list) and embeds[0] and isinstance(embeds[0][0], list) \
            else embeds
        if not rows:
            errors.append("input_embeds is empty; expected at least one row")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != hidden_size:
                got = len(row) if isinstance(row, list) else type(row).__name__
                errors.append(f"input_embeds row {i} has {got} values, expected the model's hidden size {hidden_size}")
                break
    elif not multimodal:  # multimodal prompts hold placeholder ids past the vocabulary by design
        errors.append(input_ids_error(input_ids, vocab))
    sp = getattr(obj, "sampling_params", None)
    if isinstance(sp, dict):
        stop_ids = sp.get("stop_token_ids")
        if stop_ids:  # an id no token can equal never stops anything: dropping it serves the request exactly
            sp["stop_token_ids"] = [t for t in stop_ids if not (isinstance(t, int) and not 0 <= t < vocab)]
        top_k = sp.get("top_k")
        if isinstance(top_k, int) and top_k > INT32_MAX:  # past the vocabulary: the same as off
            sp["top_k"] = -1
    top_n = getattr(obj, "top_logprobs_num", None)
    if isinstance(top_n, int) and top_n > vocab:
        errors.append(f"top_logprobs_num={top_n} is larger than the vocabulary; expected at most {vocab}")
    errors = [e for e in errors if e]
    if errors:
        raise ValueError("; ".join(errors))


def validate_request(req, enable_overlap: bool = False) -> str | None:
    """Same signature as the scheduler's dflash request check it replaces: the vocabulary error, or None."""
    if req.input_embeds is not None or req.multimodal_inputs:  # no prompt ids to check (see `admit_input`)
        return None
    return input_ids_error(req.origin_input_ids, req.vocab_size)
