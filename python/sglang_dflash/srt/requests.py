"""Per-request validation for DFLASH: what the worker does not serve yet is refused with a clear message
(the request is aborted with HTTP 400 and the server keeps serving), never half-served.

SGLang's scheduler asks this for every request when the algorithm is DFLASH (`hooks.py` puts it in
place of the scheduler's dflash request check).
"""

from __future__ import annotations


def unsupported_reason(req) -> str | None:
    sp = req.sampling_params
    checks = [
        (req.return_logprob, "return_logprob"),
        (sp.frequency_penalty != 0.0, f"frequency_penalty={sp.frequency_penalty}"),
        (sp.presence_penalty != 0.0, f"presence_penalty={sp.presence_penalty}"),
        (sp.repetition_penalty != 1.0, f"repetition_penalty={sp.repetition_penalty}"),
        (sp.min_new_tokens > 0, f"min_new_tokens={sp.min_new_tokens}"),
        (bool(getattr(sp, "logit_bias", None)), "logit_bias"),
        (any(getattr(sp, k, None) for k in ("json_schema", "regex", "ebnf", "structural_tag")),
         "constrained decoding (json_schema / regex / ebnf / structural_tag)"),
        (getattr(req, "custom_logit_processor", None) is not None, "custom_logit_processor"),
        (getattr(req, "return_hidden_states", False), "return_hidden_states"),
    ]
    bad = [name for flag, name in checks if flag]
    if bad:
        return (f"sglang-dflash does not support {', '.join(bad)} with --speculative-algorithm DFLASH yet; "
                "send the request without it, or serve without speculative decoding")
    return None


def validate_request(req, enable_overlap: bool = False) -> str | None:
    """Same signature as the scheduler's dflash request check it replaces."""
    return unsupported_reason(req)
