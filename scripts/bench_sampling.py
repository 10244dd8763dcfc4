"""Microbenchmark of the sampling distributions a sampled DFLASH step builds (`sampling.processed_probs`):
p over bs*B rows and q over bs*(B-1) rows of a 151,936-token vocabulary (Qwen3's), random logits, on this CPU.

    .venv/bin/python scripts/bench_sampling.py [--bs 1,8,48] [--block 16] [--vocab 151936] [--repeat 3]

Three cases, each timed side by side in one run (best of --repeat): the full sort (a request with top-p or
min-p in the batch), the top-k shortcut (every request has a top-k; here 50: one top-k instead of a sort),
and plain temperature (no request filters: the softmax alone, no sort), as SGLang's own sampler does.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from sglang_dflash.sampling import processed_probs


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(bs: int, block: int, vocab: int, repeat: int) -> tuple[int, float, float, float]:
    rows = bs * block + bs * (block - 1)
    logits = torch.randn(rows, vocab) * 4
    t = torch.full((rows,), 0.8)
    k, p, m = torch.full((rows,), 50), torch.full((rows,), 0.95), torch.zeros(rows)
    off_k, off_p = torch.full((rows,), vocab), torch.ones(rows)
    full = best(lambda: processed_probs(logits, t, k, p, m), repeat)
    topk = best(lambda: processed_probs(logits, t, k, off_p, m, max_top_k=50), repeat)
    plain = best(lambda: processed_probs(logits, t, off_k, off_p, m, filtered=False), repeat)
    return rows, full, topk, plain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bs", default="1,8,48")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}, block {args.block}")
    print("| bs | rows (p + q) | full sort (ms) | top-k 50 shortcut (ms) | plain temperature (ms) | sort / top-k | "
          "sort / plain |\n|---|---|---|---|---|---|---|")
    for bs in (int(b) for b in args.bs.split(",")):
        rows, full, topk, plain = measure(bs, args.block, args.vocab, args.repeat)
        print(f"| {bs} | {rows} | {1000 * full:.1f} | {1000 * topk:.1f} | {1000 * plain:.1f} | "
              f"{full / topk:.1f}x | {full / plain:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
