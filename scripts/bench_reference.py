"""Reference loop benchmark: target-only vs DFlash, side by side in one run, on one machine.

    .venv/bin/python scripts/bench_reference.py [--prompts 20] [--max-new-tokens 64] [--block-size 16]
        [--rounds 2] [--json docs/bench_reference.json]

Both sides decode the same held-out prompts greedily (the bundled tiny pair unless --target/--draft
are given); rounds alternate target-only and DFlash so drift on a noisy machine hits both. Outputs must
be identical (else exit 1). Prints a markdown table: tokens/s each side, the ratio, mean acceptance
length (tokens per decode step) and its histogram.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from sglang_dflash.assets import heldout_prompts, tiny_pair
from sglang_dflash.reference import generate, load_pair
from sglang_dflash.target import default_stop_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ignore-eos", action="store_true", help="decode max-new-tokens every time")
    ap.add_argument("--json", default=None, help="write the numbers here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_dir, d_dir = (args.target, args.draft) if args.target else tiny_pair()
    target, drafter = load_pair(t_dir, d_dir, block_size=args.block_size)
    B = args.block_size or drafter.cfg.block_size
    prompts = heldout_prompts()[: args.prompts]
    stop = frozenset() if args.ignore_eos else default_stop_ids(target)
    generate(target, drafter, prompts[:2], 8, stop_ids=stop)  # warm-up
    generate(target, None, prompts[:2], 8, stop_ids=stop)

    times = {"target": 0.0, "dflash": 0.0}
    outs: dict[str, list] = {}
    for _ in range(args.rounds):
        for side, d in (("target", None), ("dflash", drafter)):
            t0 = time.perf_counter()
            outs[side] = generate(target, d, prompts, args.max_new_tokens, stop_ids=stop, block_size=B if d else None)
            times[side] += time.perf_counter() - t0
    same = [a.output_ids == b.output_ids for a, b in zip(outs["target"], outs["dflash"])]
    tokens = sum(len(r.output_ids) for r in outs["dflash"])
    steps = [a for r in outs["dflash"] for a in r.accept_lengths]
    tps = {k: tokens * args.rounds / v for k, v in times.items()}
    hist = Counter(steps)
    res = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "block_size": B,
        "tokens_per_round": tokens, "rounds": args.rounds,
        "target_tok_s": round(tps["target"], 1), "dflash_tok_s": round(tps["dflash"], 1),
        "speedup": round(tps["dflash"] / tps["target"], 3),
        "mean_accept_length": round(sum(steps) / len(steps), 3),
        "accept_length_histogram": {k: hist[k] for k in range(1, B + 1)},
        "identical_outputs": f"{sum(same)}/{len(same)}",
    }
    print("| prompts | new tokens | B | target-only tok/s | DFlash tok/s | speed-up | mean accept length | identical |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {res['prompts']} | {tokens} | {B} | {res['target_tok_s']} | {res['dflash_tok_s']} | "
          f"{res['speedup']}x | {res['mean_accept_length']} | {res['identical_outputs']} |")
    print("\naccept length histogram (tokens per step: steps): "
          + ", ".join(f"{k}: {v}" for k, v in res["accept_length_histogram"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not all(same):
        print("ERROR: DFlash output differs from target-only output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
