"""Startup and per-step cost of tensor parallelism: DFLASH at --tp-size 1 and 2, and SGLang without speculation
at --tp-size 2, one server at a time (a TP group takes every core of a small machine).

    .venv/bin/python scripts/bench_tp.py [--concurrency 1,8] [--requests 16] [--max-new-tokens 64] [--out FILE.json]

Per side: seconds from launch to a healthy server, output tokens/s per concurrency level (warm-up excluded),
mean acceptance length, and for DFLASH the worker's step split (SGLANG_DFLASH_TIMING=1, the last 50 decode
steps of each level). TP 2 on CPU runs one rank per core (SGLANG_CPU_OMP_THREADS_BIND="0|1") over gloo.
Greedy outputs must be identical on every side: a mismatch fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_serving import last_step_timing, load_prompts, run_level  # scripts/ is sys.path[0] when run
from sglang_dflash.assets import tiny_pair
from sglang_dflash.server import Server

SIDES = [  # name, tp size, speculative
    ("dflash_tp1", 1, True),
    ("dflash_tp2", 2, True),
    ("plain_tp2", 2, False),
]


class _Quiet:
    def update(self, n: int) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t_dir, d_dir = tiny_pair()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = load_prompts(t_dir, args.requests)
    results, outputs = [], {}
    for name, tp, spec in SIDES:
        env = {"SGLANG_DFLASH_TIMING": "1"} if spec else {}
        if tp > 1:
            env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        t0 = time.perf_counter()
        server = Server(t_dir, d_dir if spec else None, "--tp-size", str(tp), "--max-total-tokens", "4096", env=env,
                        strict_memory_check=True)
        try:
            server.wait_ready()
            startup = time.perf_counter() - t0
            run_level(server, prompts[:2], args.max_new_tokens, 2, _Quiet())  # warm-up, not counted
            side = {"side": name, "tp_size": tp, "startup_s": round(startup, 1), "levels": []}
            for c in levels:
                since = len(server.log())
                res = run_level(server, prompts, args.max_new_tokens, c, _Quiet())
                outputs.setdefault(c, {})[name] = res.pop("_outputs")
                if spec:
                    res["step_timing"] = last_step_timing(server, since)
                side["levels"].append(res)
                print(name, json.dumps(res), flush=True)
        finally:
            server.stop()
        print(name, "startup", side["startup_s"], "s", flush=True)
        results.append(side)
    same = all(len({json.dumps(o) for o in by_side.values()}) == 1 for by_side in outputs.values())
    print("identical greedy outputs on every side:", same)
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "identical": same}, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
