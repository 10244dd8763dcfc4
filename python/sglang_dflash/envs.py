"""Every environment variable sglang-dflash reads, in one place.

SGLANG_ENABLE_DFLASH_SPEC_V2=1 (or SGLANG_ENABLE_SPEC_V2=1): serve DFLASH with SGLang's overlap scheduler
    (the V2 path: the scheduler prepares the next batch while this one runs; bonus tokens and lengths
    travel through its FutureMap). Off by default: DFLASH runs the synchronous scheduler.
    SGLANG_ENABLE_OVERLAP_PLAN_STREAM has no effect with our worker: for DFLASH, SGLang 0.5.23 reads it
    only in its own draft input, which ours replaces. On CPU too: SGLang 0.5.23 forces the synchronous
    scheduler on CPU only for the EAGLE family and NGRAM, not for DFLASH.
SGLANG_DFLASH_TIMING=1: time the stages of every decode step (draft, verify, accept, commit) and log the
    split of every 50 steps; off by default (it synchronises the device after each stage, which also
    serialises an overlapped scheduler: use it to see the split, not to measure throughput).
SGLANG_DFLASH_ADAPTIVE: how each decode step picks its verify width k (`srt/adaptive.py`). On by default:
    from measured step cost and acceptance, among 1 (a plain target decode), the powers of two below the block
    size B, and B (1 / on / adaptive). 0 / off / fixed: always the largest width (B unless
    SGLANG_DFLASH_VERIFY_WIDTHS leaves it out; no adaptation). cycle: the widths in turn,
    step by step (a test mode that exercises every width and every switch).
SGLANG_DFLASH_VERIFY_WIDTHS=1,4,16: the candidate widths (each in 1..B); one width forces it. Default: all
    of the above. `--speculative-num-draft-tokens` sets B and so caps them.
TRITON_INTERPRET=1 (Triton's own switch, read here too): Triton kernels run on the CPU interpreter; the CPU
    platform then also lets the drafter use SGLang's `triton` attention backend (`--attention-backend triton
    --speculative-draft-attention-backend triton`), so a GPU backend's metadata path runs on CPU (slowly).
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/0, true/false, yes/no or on/off")


def overlap_requested() -> bool:
    return _flag("SGLANG_ENABLE_DFLASH_SPEC_V2") or _flag("SGLANG_ENABLE_SPEC_V2")


def timing_enabled() -> bool:
    return _flag("SGLANG_DFLASH_TIMING")


def width_mode() -> str:
    """'adaptive' (default), 'fixed' or 'cycle' from SGLANG_DFLASH_ADAPTIVE."""
    value = os.environ.get("SGLANG_DFLASH_ADAPTIVE", "").strip().lower()
    if value in ("adaptive", "fixed", "cycle"):
        return value
    try:
        return "adaptive" if value == "" or _flag("SGLANG_DFLASH_ADAPTIVE") else "fixed"
    except ValueError:
        raise ValueError(f"SGLANG_DFLASH_ADAPTIVE={os.environ['SGLANG_DFLASH_ADAPTIVE']!r}: expected 1/0 (on/off, "
                         "true/false, yes/no), adaptive, fixed or cycle") from None


def verify_widths() -> list[int] | None:
    """The widths SGLANG_DFLASH_VERIFY_WIDTHS lists (None when unset)."""
    value = os.environ.get("SGLANG_DFLASH_VERIFY_WIDTHS", "").strip()
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"SGLANG_DFLASH_VERIFY_WIDTHS={value!r}: expected comma-separated integers, e.g. 1,4,16") \
            from None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own reading of it
