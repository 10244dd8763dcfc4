"""Kernel sweeps against the PyTorch references; run as a script with TRITON_INTERPRET=1 set before Triton
is imported (tests/test_kernels.py does that in a child process; scripts/gpu_check.sh runs it on a GPU
with --full). Outputs are poisoned before each run so an element a kernel fails to write shows up.
Prints one line per case and exits non-zero if any case fails."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `kernels` without installing
from kernels import block_prep, context_kv, greedy_accept, sample_accept  # noqa: E402

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
    ref_out = block_prep.reference(bonus, seq_lens, rows, req_to_token, 151669, B,
                                   out=_poisoned(device, (bs, B), (bs, B), (bs, B)))  # the worker's out= path
    return all(torch.equal(w, o) and torch.equal(w, r) for w, o, r in zip(want, got, ref_out))


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


def _sampling_inputs(bs, B, V, device, seed, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(bs, B - 1, V, generator=g) * sharp, -1)
    p = torch.softmax(torch.randn(bs, B, V, generator=g) * sharp, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(bs, B - 1)
    block = torch.cat([torch.zeros(bs, 1, dtype=torch.int64), drafts], 1)
    u = torch.rand(bs, B - 1, generator=g)
    e = torch.empty(bs, V).exponential_(generator=g)
    return [t.to(device) for t in (block, q, p, u, e)]


def check_sample_accept(bs, B, V, device):
    args = _sampling_inputs(bs, B, V, device, seed=bs * 7 + B)
    args[2][0, 0] = args[1][0, 0] if B > 1 else args[2][0, 0]  # p == q on one row: no residual, fallback path
    want = sample_accept.reference(*args)
    got = sample_accept.triton_impl(*args, out=_poisoned(device, (bs,), (bs,)))
    return all(torch.equal(w, o) for w, o in zip(want, got))


def check_sample_accept_distribution(device, n=3000):
    """First emitted token ~ p_0, whatever q is: chi-square over n draws of the kernel."""
    from scipy.stats import chisquare

    V, B = 6, 3
    g = torch.Generator().manual_seed(3)
    p1 = torch.softmax(torch.randn(B, V, generator=g) * 1.5, -1)
    q1 = torch.softmax(torch.randn(B - 1, V, generator=g) * 1.5, -1)
    drafts = torch.multinomial(q1.repeat(n, 1), 1, replacement=True, generator=g).view(n, B - 1)
    block = torch.cat([torch.zeros(n, 1, dtype=torch.int64), drafts], 1)
    u = torch.rand(n, B - 1, generator=g)
    e = torch.empty(n, V).exponential_(generator=g)
    args = [t.to(device) for t in (block, q1.expand(n, -1, -1), p1.expand(n, -1, -1), u, e)]
    a, bonus = (t.cpu() for t in sample_accept.triton_impl(*args))
    first = torch.where(a >= 1, block[:, 1], bonus)
    counts = torch.bincount(first, minlength=V).float()
    return chisquare(counts.numpy(), (p1[0] * n).numpy()).pvalue > 1e-3


def check_context_kv(n, L, nkv, hd, dtype, device, bias=False):
    """Against the reference AND against the drafter's own per-layer k/v (the model's definition). Pools are
    laid out as SGLang's: one [2, S, nkv, hd] allocation per layer, K and V its two halves."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from sglang_dflash.config import DFlashConfig
    from sglang_dflash.drafter import DFlashDrafter

    torch.manual_seed(n * 10 + L)
    H = 4 * hd
    cfg = DFlashConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=4,
                       num_key_value_heads=nkv, head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=4096, block_size=16, target_layer_ids=(0,), mask_token_id=1,
                       num_target_layers=4, attention_bias=bias)
    model = DFlashDrafter(cfg)
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    context = torch.randn(n, H, device=device, dtype=dtype)
    positions = torch.randint(0, 4000, (n,), device=device)
    S = 3 * n + 5
    slots = torch.randperm(S, device=device)[:n]
    w, b = context_kv.stack_kv_projection(model.layers)
    kv = torch.nn.functional.linear(context, w, b).view(n, L, 2, nkv, hd)
    k_norm = torch.stack([ly.self_attn.k_norm.weight for ly in model.layers])
    inv_freq = model.rotary.inv_freq
    runs = []
    for fn in (context_kv.reference, context_kv.triton_impl):
        fused = [torch.full((2, S, nkv, hd), float("nan"), device=device, dtype=dtype) for _ in range(L)]
        pools = context_kv.layer_pools([f[0] for f in fused], [f[1] for f in fused])
        fn(kv, k_norm, 1e-6, positions, inv_freq, slots, pools)
        runs.append(torch.stack(fused, dim=1))  # [2, L, S, nkv, hd]
    ref, got = runs
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    ok = torch.allclose(ref.float(), got.float(), equal_nan=True, **tol)
    with torch.no_grad():
        for layer_i, ly in enumerate(model.layers):
            k, v = ly.self_attn.kv(context[None], positions[None])
            ok &= torch.allclose(ref[0, layer_i, slots].float(), k[0].float(), **tol)
            ok &= torch.allclose(ref[1, layer_i, slots].float(), v[0].float(), **tol)
    untouched = torch.ones(S, dtype=torch.bool, device=device)
    untouched[slots] = False
    return bool(ok) and bool(got[:, :, untouched].isnan().all())


def cases(full: bool):
    sizes = [(1, 2), (3, 5), (17, 16), (64, 8), (5, 1)]  # B = 1: a width-1 step (a plain target decode)
    if full:
        sizes = [(bs, B) for bs in (1, 2, 7, 8, 32, 33, 64) for B in (1, 2, 3, 4, 8, 10, 15, 16)]
    for bs, B in sizes:
        yield f"block_prep bs={bs} B={B}", lambda d, bs=bs, B=B: check_block_prep(bs, B, d)
    for (bs, B), V in zip(sizes, [3, 2, 3, 151936] * len(sizes)):
        yield f"greedy_accept bs={bs} B={B} V={V}", lambda d, bs=bs, B=B, V=V: check_greedy_accept(bs, B, V, d)
    sample_sizes = [(1, 2, 5), (3, 4, 1500), (8, 16, 37), (4, 1, 37)]
    if full:
        sample_sizes = [(bs, B, V) for bs in (1, 8, 32, 64) for B in (1, 2, 4, 16) for V in (37, 4096, 151936)]
    for bs, B, V in sample_sizes:
        yield f"sample_accept bs={bs} B={B} V={V}", lambda d, bs=bs, B=B, V=V: check_sample_accept(bs, B, V, d)
    yield "sample_accept distribution (chi-square)", check_sample_accept_distribution
    ctx_sizes = [(5, 2, 2, 16, torch.float32, False), (33, 3, 1, 32, torch.float32, True)]
    if full:
        ctx_sizes = [(n, 5, 8, 128, dt, False) for n in (1, 16, 512) for dt in (torch.float32, torch.bfloat16)]
    for n, L, nkv, hd, dt, bias in ctx_sizes:
        name = (f"context_kv n={n} layers={L} kv_heads={nkv} head_dim={hd} {str(dt).removeprefix('torch.')}"
                + (" bias" if bias else ""))
        yield name, lambda d, a=(n, L, nkv, hd, dt, bias): check_context_kv(*a[:5], d, bias=a[5])


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
