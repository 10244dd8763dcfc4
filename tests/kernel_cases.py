"""Kernel sweeps against the PyTorch references; run as a script with TRITON_INTERPRET=1 set before Triton
is imported (tests/test_kernels.py does that in a child process; scripts/gpu_check.sh runs it on a GPU
with --full). Outputs are poisoned before each run so an element a kernel fails to write shows up.
Prints one line per case and exits non-zero if any case fails."""

from __future__ import annotations

import sys

import torch
from dflash_kernels import block_prep, greedy_accept

POISON = -999


def _poisoned(device, *shapes):
    return tuple(torch.full(s, POISON, dtype=torch.int64, device=device) for s in shapes)


def check_block_prep(bs, B, device):
    g = torch.Generator().manual_seed(bs * 100 + B)
    rows = (torch.randperm(80, generator=g)[:bs] + 1).to(device)
    req_to_token = torch.randint(0, 10_000, (81, 512), dtype=torch.int32, generator=g).to(device)
    seq_lens = torch.randint(0, 400, (bs,), generator=g).to(device)  # ragged
    bonus = torch.randint(0, 151936, (bs,), generator=g).to(device)
    want = block_prep.reference(bonus, seq_lens, rows, req_to_token, 151669, B)
    got = block_prep.triton_impl(bonus, seq_lens, rows, req_to_token, 151669, B,
                                 out=_poisoned(device, (bs, B), (bs, B), (bs, B)))
    return all(torch.equal(w, o) for w, o in zip(want, got))


def check_greedy_accept(bs, B, V, device):
    g = torch.Generator().manual_seed(bs * 1000 + B)
    block = torch.randint(0, V, (bs, B), generator=g)
    predict = torch.randint(0, V, (bs, B), generator=g)
    keep = torch.randint(0, B, (bs,), generator=g)  # long accepted runs: copy a prefix of the drafts
    for i in range(bs):
        predict[i, : keep[i]] = block[i, 1 : keep[i] + 1]
    seq_lens = torch.randint(1, 1000, (bs,), generator=g)
    block, predict, seq_lens = block.to(device), predict.to(device), seq_lens.to(device)
    want = greedy_accept.reference(block, predict, seq_lens)
    got = greedy_accept.triton_impl(block, predict, seq_lens, out=_poisoned(device, (bs,), (bs,), (bs, B), (bs,)))
    exercised = bool((want[0].cpu() >= keep.clamp(max=B - 1)).all())
    return exercised and all(torch.equal(w, o) for w, o in zip(want, got))


def cases(full: bool):
    sizes = [(1, 2), (3, 5), (17, 16), (64, 8)]
    if full:
        sizes = [(bs, B) for bs in (1, 2, 7, 8, 32, 33, 64) for B in (2, 3, 4, 8, 10, 15, 16)]
    for bs, B in sizes:
        yield f"block_prep bs={bs} B={B}", lambda d, bs=bs, B=B: check_block_prep(bs, B, d)
    for (bs, B), V in zip(sizes, [3, 2, 3, 151936] * len(sizes)):
        yield f"greedy_accept bs={bs} B={B} V={V}", lambda d, bs=bs, B=B, V=V: check_greedy_accept(bs, B, V, d)


def main(argv: list[str]) -> int:
    full = "--full" in argv
    device = "cuda" if "--cuda" in argv else "cpu"
    failed = 0
    for name, fn in cases(full):
        ok = fn(device)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    print(f"{sum(1 for _ in cases(full)) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
