"""The main job: DFlash on a model pair, checked against the target alone, with its speed.

    python -m sglang_dflash.demo                       # the bundled tiny pair on CPU
    python -m sglang_dflash.demo --model DIR --draft DIR [--max-new-tokens 128] [--device cuda]

For a few chat prompts it prints the answer, then per prompt: tokens, acceptance length (tokens per
decode step), tokens/s with DFlash and with the target alone, and whether both outputs are identical.
It runs the reference loop (`sglang_dflash.reference`); the SGLang server path is `launch_server
--speculative-algorithm DFLASH` once the worker lands (see README).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .assets import tiny_pair
from .reference import default_stop_ids, generate, load_pair

PROMPTS = [
    "def read_config(path):",
    "class LRUCache:\n    def __init__(self, capacity):",
    "import os\nfor root, dirs, files in os.walk(top):",
    "Write a function that parses an HTTP header line.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dflash.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="target model directory (default: the bundled tiny target)")
    ap.add_argument("--draft", default=None, help="DFlash drafter directory (default: the bundled drafter)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if (args.model is None) != (args.draft is None):
        ap.error("give both --model and --draft, or neither (the bundled pair)")
    torch.set_num_threads(args.threads)
    t_dir, d_dir = (Path(args.model), Path(args.draft)) if args.model else tiny_pair()
    for name, d in (("--model", t_dir), ("--draft", d_dir)):
        if not (d / "config.json").is_file():
            ap.error(f"{name} {str(d)!r}: no config.json there (expected a model directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t_dir)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        target, drafter = load_pair(t_dir, d_dir, device=args.device, dtype=dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = default_stop_ids(target)
    print(f"target {t_dir} | drafter {d_dir} (block {drafter.cfg.block_size}, "
          f"layers {drafter.cfg.num_hidden_layers}) | device {args.device}\n")
    generate(target, drafter, [[1, 2, 3]], 4)  # warm-up
    totals = {"dflash": [0, 0.0], "target": [0, 0.0]}
    all_steps: list[int] = []
    for text in PROMPTS[: args.prompts]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        t0 = time.perf_counter()
        spec = generate(target, drafter, [ids], args.max_new_tokens, stop_ids=stop)[0]
        t1 = time.perf_counter()
        plain = generate(target, None, [ids], args.max_new_tokens, stop_ids=stop)[0]
        t2 = time.perf_counter()
        n = len(spec.output_ids)
        tau = (n - 1) / max(1, len(spec.accept_lengths))
        all_steps += spec.accept_lengths
        totals["dflash"][0] += n
        totals["dflash"][1] += t1 - t0
        totals["target"][0] += len(plain.output_ids)
        totals["target"][1] += t2 - t1
        print(f">>> {text}")
        print(tok.decode(spec.output_ids, skip_special_tokens=True).rstrip())
        print(f"--- {n} tokens | acceptance length {tau:.2f} | DFlash {n / (t1 - t0):.0f} tok/s | "
              f"target-only {len(plain.output_ids) / (t2 - t1):.0f} tok/s | "
              f"identical: {'yes' if spec.output_ids == plain.output_ids else 'NO'}\n")
    d_tps = totals["dflash"][0] / totals["dflash"][1]
    t_tps = totals["target"][0] / totals["target"][1]
    mean_tau = sum(all_steps) / max(1, len(all_steps))
    print(f"overall: acceptance length {mean_tau:.2f} | DFlash {d_tps:.0f} tok/s | target-only {t_tps:.0f} tok/s"
          f" | speed-up {d_tps / t_tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
