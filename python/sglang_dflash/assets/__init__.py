"""Bundled model files.

`tiny_pair()` -> (target_dir, draft_dir): a 4-layer Qwen3 target (hidden 256, vocab 4096, a byte-level
BPE tokenizer with a chat template) trained on Python standard-library source, and a 2-layer DFlash
drafter (block size 16) trained on that target's greedy outputs. Rebuilt by `scripts/make_tiny_pair.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent / "tiny_pair"


def tiny_pair() -> tuple[Path, Path]:
    target, draft = _HERE / "target", _HERE / "draft"
    for d in (target, draft):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"bundled model {d} is missing; rebuild it with `python scripts/make_tiny_pair.py`"
            )
    return target, draft


def heldout_prompts() -> list[list[int]]:
    """Token-id prompts from standard-library files the tiny pair never trained on."""
    return json.loads((_HERE / "heldout_prompts.json").read_text())
