"""The prepared GPU check: kernel sweeps, then microbenchmarks at Qwen3-4B shapes (random bf16 weights).

    OUT=/some/dir python scripts/gpu_check.py            # on a GPU machine (torch + Triton; no SGLang needed)
    OUT=/tmp/x python scripts/gpu_check.py --dry-run     # tiny shapes on CPU, same code path end to end

Measures first the device's copy bandwidth and bf16 matrix rate, then, at batch 1, 8 and 32: the drafter
forward (5 layers, hidden 2560, 32 heads, 8 KV heads, head dim 128, B = 16, 1024 context tokens), a
verify-sized forward of the same width (36 such layers, causal), the same verify-sized forward at verify
widths k = 1, 2, 4, 8, 16 tokens per request (same context, eager and as CUDA graphs: the step-cost curve
T(bs, k) the adaptive width chooser weighs against acceptance, tabulated at the end of gpu_check.md), each
kernel against its PyTorch reference (context_kv also at head dim 80, where the registry falls back to the
reference), the sampling distributions of a sampled step (full sort vs SGLang's shortcuts, with peak memory),
the whole context write (per layer vs the wired stacked projection + context_kv), and one full draft step
(block prep + drafter forward + lm_head argmax + greedy accept); on a GPU the draft step and the verify-sized
forwards are also timed as CUDA graphs, as SGLang replays them (a dry run times eager only).
Each row reports time, and achieved FLOP/s or bytes/s against the measured peaks. Writes
$OUT/gpu_check.json and $OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))

from sglang_dflash.config import DFlashConfig  # noqa: E402
from sglang_dflash.drafter import DFlashDrafter  # noqa: E402

from kernels import block_prep, context_kv, greedy_accept, sample_accept  # noqa: E402

QWEN3_4B = dict(hidden=2560, heads=32, kv_heads=8, head_dim=128, inter=9728, vocab=151936, target_layers=36,
                draft_layers=5, B=16, ctx=1024)
WIDTHS = (1, 2, 4, 8, 16)  # verify widths k of the step-cost curve (16 = B)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=1000, target_layers=4, draft_layers=2,
            B=16, ctx=64)


def timeit(fn, device, iters: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_time(fn, iters: int) -> float:
    """Median seconds per replay of `fn` captured as one CUDA graph (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timeit(graph.replay, "cuda", iters)


def peaks(device, dtype, dry: bool, iters: int) -> dict:
    n = (1 << 24) if dry else (1 << 28)  # elements copied (x2 bytes bf16 / x4 fp32)
    src = torch.empty(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, iters)
    copy_bw = 2 * src.numel() * src.element_size() / t  # read + write
    m = 512 if dry else 8192
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    t = timeit(lambda: a @ b, device, iters)
    return {"copy_bytes_per_s": copy_bw, "matmul_flop_per_s": 2 * m**3 / t}


def drafter(shape, layers: int, device, dtype) -> DFlashDrafter:
    cfg = DFlashConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_hidden_layers=layers,
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       head_dim=shape["head_dim"], rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=40960, block_size=shape["B"],
                       target_layer_ids=tuple(range(min(5, shape["target_layers"] - 1))), mask_token_id=1,
                       num_target_layers=shape["target_layers"], vocab_size=shape["vocab"])
    model = DFlashDrafter(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def layer_flops(shape, tokens: int, keys: int) -> float:
    H, hd, nh, nkv, inter = shape["hidden"], shape["head_dim"], shape["heads"], shape["kv_heads"], shape["inter"]
    proj = 2 * tokens * H * (nh * hd + 2 * nkv * hd + nh * hd) + 2 * tokens * 3 * H * inter
    attn = 2 * 2 * tokens * keys * nh * hd
    return proj + attn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to check the script itself")
    args = ap.parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "gpu_check_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    dtype = torch.float32 if dry else torch.bfloat16
    shape = TINY if dry else QWEN3_4B
    iters = 3 if dry else 20
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "torch": torch.__version__,
           "shape": shape, "rows": []}
    res["peaks"] = peaks(device, dtype, dry, iters)
    pk = res["peaks"]
    print(f"peaks: copy {pk['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {pk['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s")

    def row(name, bs, seconds, flops=None, nbytes=None, note="", **fields):
        r = {"name": name, "bs": bs, "ms": round(seconds * 1e3, 4), **fields}
        if flops:
            r["tflop_s"] = round(flops / seconds / 1e12, 3)
            r["of_peak_matmul"] = round(flops / seconds / pk["matmul_flop_per_s"], 3)
        if nbytes:
            r["gb_s"] = round(nbytes / seconds / 1e9, 2)
            r["of_peak_copy"] = round(nbytes / seconds / pk["copy_bytes_per_s"], 3)
        r["note"] = note
        res["rows"].append(r)
        print(json.dumps(r), flush=True)

    B, H, V, ctx = shape["B"], shape["hidden"], shape["vocab"], shape["ctx"]
    assert max(WIDTHS) == B and min(WIDTHS) >= 1, (WIDTHS, B)
    draft = drafter(shape, shape["draft_layers"], device, dtype)
    verify = drafter(shape, shape["target_layers"], device, dtype)  # same layer kind: the width of a verify
    lm_head = torch.randn(V, H, dtype=dtype, device=device) * 0.02
    K = draft.cfg.num_target_features
    w_stack, b_stack = context_kv.stack_kv_projection(draft.layers)
    k_norms = torch.stack([ly.self_attn.k_norm.weight for ly in draft.layers])
    with torch.no_grad():
        for bs in ((1, 4) if dry else (1, 8, 32)):
            feats = torch.randn(bs, ctx, K * H, dtype=dtype, device=device)
            pos = torch.arange(ctx, device=device)[None].expand(bs, ctx)
            bpos = torch.arange(ctx, ctx + B, device=device)[None].expand(bs, B)
            emb = torch.randn(bs, B, H, dtype=dtype, device=device)
            kv_d = draft.context_kv(draft.project(feats), pos)
            t = timeit(lambda emb=emb, bpos=bpos, kv_d=kv_d: draft(emb, bpos, kv_d), device, iters)
            row("drafter forward", bs, t, flops=shape["draft_layers"] * layer_flops(shape, bs * B, ctx + B))
            kv_v = verify.context_kv(verify.project(feats), pos)
            causal = torch.ones(bs, B, ctx + B, dtype=torch.bool, device=device)
            causal[:, :, ctx:] = torch.tril(torch.ones(B, B, dtype=torch.bool, device=device))
            t_verify = timeit(lambda emb=emb, bpos=bpos, kv_v=kv_v, causal=causal: verify(emb, bpos, kv_v, causal),
                              device, iters)
            row("verify-sized forward (36 layers)" if not dry else "verify-sized forward", bs, t_verify,
                flops=shape["target_layers"] * layer_flops(shape, bs * B, ctx + B))
            # the same forward at verify width k (k tokens per request, same context): T(bs, k), eager and graphed
            at_full = {}  # mode -> seconds at k = B (measured first)
            for k in sorted(WIDTHS, reverse=True):
                mask_k = causal[:, :k, :ctx + k].contiguous()  # context visible, causal within the k block tokens

                def fwd(emb=emb[:, :k].contiguous(), bpos=bpos[:, :k].contiguous(), kv_v=kv_v, mask=mask_k):
                    return verify(emb, bpos, kv_v, mask)

                flops_k = shape["target_layers"] * layer_flops(shape, bs * k, ctx + k)
                modes = {"eager": lambda fwd=fwd: timeit(fwd, device, iters)}
                if device == "cuda":
                    modes["CUDA graph"] = lambda fwd=fwd: graph_time(fwd, iters)
                for mode, measure in modes.items():
                    try:
                        t_k = measure()
                    except Exception as e:  # report, never lose the rest of the run
                        row(f"verify-sized forward, width k={k}, {mode}", bs, 0.0, k=k, mode=mode,
                            note=f"failed: {type(e).__name__}: {e}"[:200])
                        continue
                    if k == B:
                        at_full[mode] = t_k
                    row(f"verify-sized forward, width k={k}, {mode}", bs, t_k, flops=flops_k, k=k, mode=mode,
                        note=f"{t_k / at_full[mode]:.2f} of k={B}" if mode in at_full else "")
            # kernels vs references
            rows_ = torch.arange(bs, device=device) + 1
            r2t = torch.randint(0, 100_000, (bs + 1, ctx + 2 * B), dtype=torch.int32, device=device)
            seq = torch.full((bs,), ctx, device=device)
            bonus = torch.randint(0, V, (bs,), device=device)
            for name, mod, fn_args, nbytes in (
                ("block_prep", block_prep, (bonus, seq, rows_, r2t, 1, B), bs * B * 8 * 3 + bs * B * 4),
                ("greedy_accept", greedy_accept,
                 (torch.randint(0, V, (bs, B), device=device), torch.randint(0, V, (bs, B), device=device), seq),
                 bs * B * 8 * 3 + bs * 8 * 3),
                ("sample_accept", sample_accept,
                 (torch.randint(0, V, (bs, B), device=device),
                  torch.rand(bs, B - 1, V, dtype=torch.float32, device=device),
                  torch.rand(bs, B, V, dtype=torch.float32, device=device),
                  torch.rand(bs, B - 1, device=device), torch.rand(bs, V, device=device) + 0.1),
                 bs * V * 4 * 3 + bs * B * 8 * 2),
            ):
                t_ref = timeit(lambda mod=mod, a=fn_args: mod.reference(*a), device, iters)
                t_k = timeit(lambda mod=mod, a=fn_args: mod.triton_impl(*a), device, iters)
                row(f"{name} reference", bs, t_ref, nbytes=nbytes)
                row(f"{name} kernel", bs, t_k, nbytes=nbytes, note=f"{t_ref / t_k:.2f}x faster than reference")
            # context K/V materialisation for the 16 committed rows of every request (the commit step)
            n, L, nkv, hd = bs * B, shape["draft_layers"], shape["kv_heads"], shape["head_dim"]
            kv = torch.randn(n, L, 2, nkv, hd, dtype=dtype, device=device)
            knorm = torch.ones(L, hd, dtype=dtype, device=device)
            cpos = torch.randint(0, ctx, (n,), device=device)
            cslots = torch.randperm(4 * n, device=device)[:n]
            fused = [torch.zeros(2, 4 * n, nkv, hd, dtype=dtype, device=device) for _ in range(L)]  # SGLang's layout
            pools = context_kv.layer_pools([f[0] for f in fused], [f[1] for f in fused])
            cargs = (kv, knorm, 1e-6, cpos, draft.rotary.inv_freq, cslots, pools)
            nbytes = 2 * kv.numel() * kv.element_size()  # read the projection, write both pools
            t_ref = timeit(lambda a=cargs: context_kv.reference(*a), device, iters)
            t_k = timeit(lambda a=cargs: context_kv.triton_impl(*a), device, iters)
            row("context_kv reference", bs, t_ref, nbytes=nbytes)
            row("context_kv kernel", bs, t_k, nbytes=nbytes, note=f"{t_ref / t_k:.2f}x faster than reference")
            # head_dim 80 (half 40, not a power of two): the registry gives the reference there
            hd80 = 80 if not dry else 10
            fused80 = [torch.zeros(2, 4 * n, nkv, hd80, dtype=dtype, device=device) for _ in range(L)]
            pools80 = context_kv.layer_pools([f[0] for f in fused80], [f[1] for f in fused80])
            inv80 = 1.0 / (1e6 ** (torch.arange(0, hd80, 2, device=device).float() / hd80))
            args80 = (torch.randn(n, L, 2, nkv, hd80, dtype=dtype, device=device),
                      torch.ones(L, hd80, dtype=dtype, device=device), 1e-6, cpos, inv80, cslots, pools80)
            assert not context_kv.supports(hd80) and context_kv.supports(hd)
            row(f"context_kv head_dim {hd80} (reference: the kernel needs a power-of-two half head)", bs,
                timeit(lambda a=args80: context_kv.reference(*a), device, iters), nbytes=nbytes * hd80 // hd)
            # a sampled step's distributions: p over bs*B rows and q over bs*(B-1) rows of the vocabulary,
            # full sort vs SGLang's shortcuts (top-k only; plain temperature); peak memory on a GPU
            from sglang_dflash.sampling import processed_probs

            srows = bs * (2 * B - 1)
            slog = torch.randn(srows, V, device=device) * 4
            full_args = (slog, torch.full((srows,), 0.8, device=device), torch.full((srows,), 50, device=device),
                         torch.full((srows,), 0.95, device=device), torch.zeros(srows, device=device))
            topk_args = (*full_args[:3], torch.ones(srows, device=device), full_args[4])
            plain_args = (*full_args[:2], torch.full((srows,), V, device=device), *topk_args[3:])
            cases = {"full sort (top-k 50 + top-p 0.95)": lambda a=full_args: processed_probs(*a),
                     "top-k 50 shortcut": lambda a=topk_args: processed_probs(*a, max_top_k=50),
                     "plain temperature (no sort)": lambda a=plain_args: processed_probs(*a, filtered=False)}
            for what, fn in cases.items():
                note = ""
                if device == "cuda":
                    torch.cuda.synchronize()
                    base_mem = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    torch.cuda.synchronize()
                    note = f"peak +{(torch.cuda.max_memory_allocated() - base_mem) / 2**20:.0f} MiB"
                row(f"sampling probs, {what}, {srows} rows", bs, timeit(fn, device, iters), note=note)
            del slog, full_args, topk_args, plain_args, cases
            # the whole context write the worker does after each accept (n = bs*B rows), from target hidden
            # states: per layer (k_proj, v_proj, k_norm, RoPE, two scatters each) vs the wired path (ONE
            # stacked projection + kernel context_kv)
            hid = torch.randn(n, K * H, dtype=dtype, device=device)

            def per_layer(hid=hid, cpos=cpos, cslots=cslots, pools=pools):
                for layer_i, (k, v) in enumerate(draft.context_kv(draft.project(hid[None]), cpos[None])):
                    pools.k[layer_i][cslots] = k[0]
                    pools.v[layer_i][cslots] = v[0]

            def stacked(hid=hid, cpos=cpos, cslots=cslots, pools=pools, kv_shape=(n, L, 2, nkv, hd)):
                kv = torch.nn.functional.linear(draft.project(hid), w_stack, b_stack).view(kv_shape)
                context_kv.triton_impl(kv, k_norms, 1e-6, cpos, draft.rotary.inv_freq, cslots, pools)

            t_per, t_stk = timeit(per_layer, device, iters), timeit(stacked, device, iters)
            ctx_flops = 2 * n * (K * H * H + H * L * 2 * nkv * hd)
            row("context write, per layer", bs, t_per, flops=ctx_flops)
            row("context write, stacked + context_kv (wired)", bs, t_stk, flops=ctx_flops,
                note=f"{t_per / t_stk:.2f}x faster than per layer")
            # one whole draft step: block prep + drafter forward + lm_head argmax + greedy accept
            def step(kv_d=kv_d, seq=seq, rows_=rows_, r2t=r2t, bonus=bonus, emb=emb):
                ids, positions, _ = block_prep.triton_impl(bonus, seq, rows_, r2t, 1, B)
                hidden = draft(emb, positions, kv_d)
                drafts = (hidden[:, 1:] @ lm_head.T).argmax(-1)
                verify_ids = torch.cat([ids[:, :1], drafts], 1)
                greedy_accept.triton_impl(verify_ids, verify_ids, seq)

            t_step = timeit(step, device, iters)
            row("draft step (prep + drafter + lm_head argmax + accept)", bs, t_step,
                note=f"{t_step / t_verify:.2f} of one verify-sized forward")
            if device == "cuda":  # SGLang replays both forwards as CUDA graphs: compare them that way too
                try:
                    g_step = graph_time(step, iters)
                    g_verify = graph_time(lambda emb=emb, bpos=bpos, kv_v=kv_v, causal=causal:
                                          verify(emb, bpos, kv_v, causal), iters)
                    row("verify-sized forward, CUDA graph", bs, g_verify,
                        flops=shape["target_layers"] * layer_flops(shape, bs * B, ctx + B))
                    row("draft step, CUDA graph", bs, g_step, note=f"{g_step / g_verify:.2f} of one verify (graphs)")
                except Exception as e:  # report, never lose the rest of the run
                    row("CUDA graph timing", bs, 0.0, note=f"failed: {type(e).__name__}: {e}"[:200])
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# GPU check ({res['device']}, torch {res['torch']})", "",
             f"Peaks measured first: copy {pk['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"bf16 matmul {pk['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s.", "",
             "| what | bs | ms | TFLOP/s (of peak) | GB/s (of peak) | note |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tf = f"{r['tflop_s']} ({r['of_peak_matmul']:.0%})" if "tflop_s" in r else ""
        gb = f"{r['gb_s']} ({r['of_peak_copy']:.1%})" if "gb_s" in r else ""
        lines.append(f"| {r['name']} | {r['bs']} | {r['ms']} | {tf} | {gb} | {r['note']} |")
    curve = {(r["mode"], r["bs"], r["k"]): r["ms"] for r in res["rows"] if "k" in r and r["ms"] > 0}
    lines += ["", f"Verify-sized forward ({shape['target_layers']} layers, {ctx} context tokens), ms per forward "
              "at width k (tokens per request):", "",
              "| mode | bs | " + " | ".join(f"k={k}" for k in WIDTHS) + " |", "|---|---|" + "---|" * len(WIDTHS)]
    for mode, bs in sorted({(m, b) for m, b, _ in curve}):
        lines.append(f"| {mode} | {bs} | " + " | ".join(str(curve.get((mode, bs, k), "")) for k in WIDTHS) + " |")
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
