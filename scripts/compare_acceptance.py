"""Greedy acceptance of one drafter pair under two versions of sglang-dflash, side by side: the same prompts
through a server on this checkout and one on another (a PYTHONPATH holding that version's `sglang_dflash` and
`dflash_kernels`), one request at a time. Prints one JSON line; exits 1 unless outputs and verify steps are
identical (a change that should not touch plain requests must not move their acceptance).

    git worktree add /tmp/before <commit> && mkdir /tmp/before/.pypath
    ln -s /tmp/before/python/sglang_dflash /tmp/before/.pypath/
    ln -s /tmp/before/kernels /tmp/before/.pypath/dflash_kernels
    python scripts/compare_acceptance.py --before-pythonpath /tmp/before/.pypath
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    from sglang_dflash.assets import heldout_prompts, tiny_pair
    from sglang_dflash.server import Server, start_all

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-pythonpath", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    target, draft = tiny_pair()
    after, before = Server(target, draft), Server(target, draft, env={"PYTHONPATH": args.before_pythonpath})
    start_all(after, before)
    try:
        prompts = heldout_prompts()[: args.prompts]
        rows = []
        for s in (before, after):
            outs = s.generate_many(prompts, args.max_new_tokens, concurrency=1, ignore_eos=True)
            rows.append([(o["output_ids"], o["meta_info"]["spec_verify_ct"], o["meta_info"]["spec_accept_length"])
                         for o in outs])
    finally:
        after.stop()
        before.stop()
    same_out = all(a[0] == b[0] for a, b in zip(*rows))
    same_steps = all(a[1] == b[1] for a, b in zip(*rows))
    mean = lambda r: round(sum(x[2] for x in r) / len(r), 4)  # noqa: E731
    print(json.dumps({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "outputs_identical": same_out,
                      "verify_steps_identical": same_steps, "mean_accept_length_before": mean(rows[0]),
                      "mean_accept_length_after": mean(rows[1])}))
    return 0 if same_out and same_steps else 1


if __name__ == "__main__":
    sys.exit(main())
