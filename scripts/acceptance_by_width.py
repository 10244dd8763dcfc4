"""Acceptance when the drafter drafts a block shorter than the one it was trained on (the adaptive verify width).

    .venv/bin/python scripts/acceptance_by_width.py [--prompts 16] [--max-new-tokens 64] [--target DIR --draft DIR]

For each width k in 16, 8, 4, 2 (k <= the drafter's block size): greedy generation with the reference loop
(`reference.generate`) drafting blocks of k tokens, mean tokens per step; beside it, the full block's per-step
accept lengths capped at k (what verifying only the first k - 1 drafts of a full block would commit). Outputs
are the target's at every width (the loop is lossless), so only the acceptance differs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

from sglang_dflash.assets import heldout_prompts, tiny_pair
from sglang_dflash.reference import generate, load_pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    target_dir, draft_dir = (args.target, args.draft) if args.target else tiny_pair()
    prompts = heldout_prompts()[: args.prompts]
    full = None
    outputs = None
    print("| width k | drafted at width k: tokens per step | full block, capped at k: tokens per step |")
    print("|---|---|---|")
    target, drafter = load_pair(target_dir, draft_dir)
    B = drafter.cfg.block_size
    for k in [w for w in (16, 8, 4, 2) if w <= B]:
        target, drafter = load_pair(target_dir, draft_dir, block_size=k)
        results = generate(target, drafter, prompts, args.max_new_tokens, block_size=k)
        steps = [a for r in results for a in r.accept_lengths]
        if full is None:
            full, outputs = steps, [r.output_ids for r in results]
        if [r.output_ids for r in results] != outputs:
            raise SystemExit(f"width {k}: outputs differ from the full block's (the loop must be lossless)")
        capped = statistics.mean(min(a, k) for a in full)
        print(f"| {k} | {statistics.mean(steps):.3f} | {capped:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
