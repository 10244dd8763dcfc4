"""Time the CPU verify attention (`srt/attention.py`, TARGET_VERIFY) alone, optionally side by side with
the same file at another git revision, in one process (one thread, the bundled target's head shapes).

    .venv/bin/python scripts/bench_verify_attention.py                   # this checkout
    .venv/bin/python scripts/bench_verify_attention.py --against a8e14bf # and that revision, interleaved

Reports the median time of one 4-layer verify forward's attention (the bundled target has 4 layers;
4 query heads, 2 KV heads, head dim 64, B = 16) for a few batch sizes and context lengths; each side is
measured 3 times, interleaved, and the best of the 3 medians is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
FILE = "python/sglang_dflash/srt/attention.py"
SHAPES = [(1, 150), (8, 150), (16, 300)]  # (requests, committed length)


class Pool:
    def __init__(self, n: int, nkv: int, hd: int) -> None:
        self.k, self.v = torch.randn(n, nkv, hd), torch.randn(n, nkv, hd)

    def set_kv_buffer(self, layer, loc, k, v) -> None:
        self.k[loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.view(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id: int):
        return self.k

    def get_value_buffer(self, layer_id: int):
        return self.v


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_forward(module, bs: int, L: int, layers: int = 4, iters: int = 200) -> float:
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    nh, nkv, hd, B = 4, 2, 64, 16
    req_to_token = torch.randint(1, 50_000, (bs + 1, 4096), dtype=torch.int32)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=Pool(50_001, nkv, hd))
    backend = module.VerifyCapableTorchNativeBackend(runner)
    backend.swa_out_cache_loc = None
    layer = SimpleNamespace(tp_q_head_num=nh, tp_k_head_num=nkv, qk_head_dim=hd, v_head_dim=hd, layer_id=0,
                            scaling=hd**-0.5, is_cross_attention=False, sliding_window_size=-1,
                            attn_type=AttentionType.DECODER)
    q, k, v = torch.randn(bs * B, nh * hd), torch.randn(bs * B, nkv * hd), torch.randn(bs * B, nkv * hd)

    def forward():
        seq = torch.randint(L - 20, L, (bs,))
        fb = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, spec_info=SimpleNamespace(draft_token_num=B),
                             seq_lens=seq, seq_lens_cpu=seq, req_pool_indices=torch.arange(1, bs + 1),
                             out_cache_loc=torch.randint(1, 50_000, (bs * B,)))
        for _ in range(layers):
            backend.forward_extend(q, k, v, layer, fb)

    for _ in range(20):
        forward()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="a git revision whose srt/attention.py is timed beside this checkout's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sides = {"this checkout": load(ROOT / FILE, "attention_here")}
    if args.against:
        text = subprocess.run(["git", "show", f"{args.against}:{FILE}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        tmp = Path(tempfile.mkdtemp()) / "attention_then.py"
        tmp.write_text(text)
        sides = {args.against: load(tmp, "attention_then"), **sides}
    print("| requests | committed length | " + " | ".join(f"{s} (ms)" for s in sides) + " |")
    print("|---" * (2 + len(sides)) + "|")
    for bs, L in SHAPES:
        best = {s: time_forward(m, bs, L) for s, m in sides.items()}
        for _ in range(2):  # interleave the repeats so drift hits both sides alike
            for s, m in sides.items():
                best[s] = min(best[s], time_forward(m, bs, L))
        print(f"| {bs} | {L} | " + " | ".join(f"{best[s] * 1e3:.3f}" for s in sides) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
